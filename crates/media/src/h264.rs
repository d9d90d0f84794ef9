//! H.264 through OpenH264: frames → length-prefixed samples plus SPS/PPS, and back.

use anyhow::{bail, Context, Result};
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange,
    RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::YUVSource;
use openh264::{OpenH264API, Timestamp};

use crate::encode::{EncodeOptions, Rational};
use crate::yuv::{Yuv420, YuvPlanes};
use crate::Frames;

const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_IDR: u8 = 5;
const NAL_SLICE: u8 = 1;

/// An encoded H.264 stream ready for MP4: one sample per frame (NAL units with 4-byte big-endian
/// lengths, parameter sets removed) and the parameter sets for `avcC`.
pub struct H264Stream {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub samples: Vec<Vec<u8>>,
    pub keyframes: Vec<bool>,
}

impl YUVSource for Yuv420 {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.chroma_width(), self.chroma_width())
    }

    fn y(&self) -> &[u8] {
        &self.y
    }

    fn u(&self) -> &[u8] {
        &self.u
    }

    fn v(&self) -> &[u8] {
        &self.v
    }
}

pub fn encode(frames: &Frames, fps: Rational, options: &EncodeOptions) -> Result<H264Stream> {
    let keyframe_interval = options.keyframe_interval_frames(fps);
    let config = EncoderConfig::new()
        // Skipped frames would break the frame count: never.
        .skip_frames(false)
        // Quality mode clipped to one QP is a constant quantiser: OpenH264's "off" mode ignores the
        // QP range and always uses 26. The bitrate is only a ceiling hint for the rate controller.
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps(100_000_000))
        .qp(QpRange::new(options.h264_qp, options.h264_qp))
        .max_frame_rate(FrameRate::from_hz(fps.as_f64() as f32))
        .usage_type(UsageType::CameraVideoRealTime)
        .complexity(Complexity::High)
        .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_interval))
        .num_threads(1)
        .vui(VuiConfig::bt709());
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .context("initialising the OpenH264 encoder")?;
    // The wrapper quiets OpenH264's console log only after initialising, which prints a warning
    // on stderr about the (deliberately) disabled frame skipping; quiet it before. Failures are
    // still reported through return codes.
    let mut quiet = openh264_sys2::WELS_LOG_QUIET;
    // SAFETY: the trace level is the one option OpenH264 accepts before initialisation; the
    // pointer is to a live integer of the type it reads.
    unsafe {
        encoder.raw_api().set_option(
            openh264_sys2::ENCODER_OPTION_TRACE_LEVEL,
            (&raw mut quiet).cast(),
        );
    }
    let mut stream = H264Stream {
        sps: Vec::new(),
        pps: Vec::new(),
        samples: Vec::new(),
        keyframes: Vec::new(),
    };
    for index in 0..frames.len() {
        let yuv = Yuv420::from_frame(frames, index);
        let millis = (index as u64 * 1000 * fps.den as u64) / fps.num as u64;
        let bitstream = encoder
            .encode_at(&yuv, Timestamp::from_millis(millis))
            .with_context(|| format!("H.264 encoding of frame {index}"))?;
        if matches!(bitstream.frame_type(), FrameType::Skip | FrameType::Invalid) {
            bail!("H.264 encoder skipped frame {index}; the file would miss a frame");
        }
        let mut sample = Vec::new();
        let mut has_picture = false;
        let mut keyframe = false;
        for l in 0..bitstream.num_layers() {
            let layer = bitstream.layer(l).context("missing H.264 layer")?;
            for n in 0..layer.nal_count() {
                let nal = strip_start_code(layer.nal_unit(n).context("missing NAL unit")?);
                let Some(&header) = nal.first() else { continue };
                match header & 0x1f {
                    NAL_SPS => keep_parameter_set(&mut stream.sps, nal, "SPS")?,
                    NAL_PPS => keep_parameter_set(&mut stream.pps, nal, "PPS")?,
                    kind => {
                        has_picture |= kind == NAL_IDR || kind == NAL_SLICE;
                        keyframe |= kind == NAL_IDR;
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
        }
        if !has_picture {
            bail!("H.264 encoder produced no picture for frame {index}");
        }
        stream.samples.push(sample);
        stream.keyframes.push(keyframe);
    }
    if stream.sps.is_empty() || stream.pps.is_empty() {
        bail!("H.264 encoder produced no SPS/PPS");
    }
    Ok(stream)
}

/// The encoder repeats SPS/PPS before every IDR; `avcC` holds them once, so they must not change.
fn keep_parameter_set(slot: &mut Vec<u8>, nal: &[u8], what: &str) -> Result<()> {
    if slot.is_empty() {
        slot.extend_from_slice(nal);
    } else if slot != nal {
        bail!("H.264 encoder changed its {what} mid-stream; MP4 avcC cannot describe that");
    }
    Ok(())
}

fn strip_start_code(nal: &[u8]) -> &[u8] {
    if nal.starts_with(&[0, 0, 0, 1]) {
        &nal[4..]
    } else if nal.starts_with(&[0, 0, 1]) {
        &nal[3..]
    } else {
        nal
    }
}

/// Human name of an SPS's profile (`profile_idc` and the constraint flags).
pub fn profile_name(sps: &[u8]) -> String {
    let (Some(&profile), Some(&constraints)) = (sps.get(1), sps.get(2)) else {
        return "unknown profile".into();
    };
    match profile {
        66 if constraints & 0x40 != 0 => "Constrained Baseline".into(),
        66 => "Baseline".into(),
        77 => "Main".into(),
        88 => "Extended".into(),
        100 => "High".into(),
        110 => "High 10".into(),
        122 => "High 4:2:2".into(),
        244 => "High 4:4:4 Predictive".into(),
        other => format!("profile {other}"),
    }
}

/// Decodes MP4-style samples (NAL units with `length_size`-byte lengths) to RGB frames.
pub fn decode(sps_pps: &[Vec<u8>], samples: &[Vec<u8>], length_size: usize) -> Result<Frames> {
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .context("initialising the OpenH264 decoder")?;
    let mut annexb = Vec::new();
    for ps in sps_pps {
        annexb.extend_from_slice(&[0, 0, 0, 1]);
        annexb.extend_from_slice(ps);
    }
    let mut rgb = Vec::new();
    let mut size = None;
    let mut count = 0usize;
    let mut collect = |planes: YuvPlanes, rgb: &mut Vec<u8>| -> Result<()> {
        let dims = (planes.width, planes.height);
        if *size.get_or_insert(dims) != dims {
            bail!(
                "H.264 stream changes size mid-stream ({:?} → {dims:?})",
                size
            );
        }
        planes.append_rgb(rgb);
        count += 1;
        Ok(())
    };
    for (index, sample) in samples.iter().enumerate() {
        let mut pos = 0;
        while pos < sample.len() {
            let Some(len_bytes) = sample.get(pos..pos + length_size) else {
                bail!("H.264 sample {index}: truncated NAL length");
            };
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            let nal = sample
                .get(pos + length_size..pos + length_size + len)
                .with_context(|| format!("H.264 sample {index}: NAL runs past the sample"))?;
            annexb.extend_from_slice(&[0, 0, 0, 1]);
            annexb.extend_from_slice(nal);
            pos += length_size + len;
        }
        let decoded = decoder
            .decode(&annexb)
            .with_context(|| format!("decoding H.264 sample {index}"))?;
        if let Some(picture) = decoded {
            collect(planes_of(&picture), &mut rgb)?;
        }
        annexb.clear();
    }
    for picture in decoder
        .flush_remaining()
        .context("flushing the H.264 decoder")?
    {
        collect(planes_of(&picture), &mut rgb)?;
    }
    let (width, height) = size.context("H.264 stream decoded to no pictures")?;
    Frames::from_rgb(rgb, width, height, count)
}

fn planes_of<'a>(picture: &'a impl YUVSource) -> YuvPlanes<'a> {
    let (width, height) = picture.dimensions();
    let (y_stride, uv_stride, _) = picture.strides();
    YuvPlanes {
        width,
        height,
        y: picture.y(),
        u: picture.u(),
        v: picture.v(),
        y_stride,
        uv_stride,
    }
}
