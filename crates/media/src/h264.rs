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

/// OpenH264's lowest quantiser: it raises any smaller one to this.
const OPENH264_MIN_QP: u8 = 12;
/// How much coarser each new attempt is after the stream did not fit (see [`encode`]).
const QP_STEP: u8 = 2;
/// `cmMallocMemeError`: what `EncodeFrame` returns when a coded frame overflows its buffer.
const NATIVE_OVERFLOW: i64 = openh264_sys2::cmMallocMemeError as i64;

/// Encodes every frame at the quantiser `options.h264_qp`, or, if the clip does not fit in
/// OpenH264's output buffer at that quantiser, at the finest coarser one at which it does.
///
/// OpenH264 allocates one bitstream buffer per frame the size of the raw I420 picture
/// (`COMPRESS_RATIO_THR` = 1.0 in its `RequestMemorySvc`) and, lacking I_PCM macroblocks, has no
/// way to bound a frame below that: content with no spatial or temporal redundancy (random noise,
/// e.g. a VAE decoding random weights) at a fine quantiser (about QP < 22 for full-range noise)
/// codes to more than 12 bits per pixel. The encoder then aborts the frame with `cmMallocMemeError`
/// (native code 3) and frees its own context, so the encoder cannot go on. We restart the whole
/// clip with a fresh encoder at a coarser quantiser instead: one encoder per clip keeps the stream
/// simple (one SPS/PPS, IDR ids in sequence, keyframes where requested), and the retry costs time
/// only for the rare clip that needs it. Every frame is still coded (frame skipping stays off); at
/// QP 51 any content fits.
pub fn encode(frames: &Frames, fps: Rational, options: &EncodeOptions) -> Result<H264Stream> {
    let mut qp = options.h264_qp;
    loop {
        match encode_at_qp(frames, fps, options, qp)? {
            Ok(stream) => return Ok(stream),
            Err(_) if qp < 51 => qp = (qp.max(OPENH264_MIN_QP) + QP_STEP).min(51),
            Err(overflow) => {
                return Err(anyhow::Error::new(overflow.error).context(format!(
                    "H.264 encoding of frame {}: the coded frame does not fit in OpenH264's \
                     output buffer even at QP 51",
                    overflow.frame
                )))
            }
        }
    }
}

/// A frame that did not fit in OpenH264's output buffer at some quantiser.
#[derive(Debug)]
pub(crate) struct Overflow {
    pub frame: usize,
    pub error: openh264::Error,
}

/// One attempt of [`encode`] at a fixed quantiser: `Ok(Err(_))` when a frame overflowed OpenH264's
/// buffer (worth retrying coarser), `Err(_)` for any other failure.
pub(crate) fn encode_at_qp(
    frames: &Frames,
    fps: Rational,
    options: &EncodeOptions,
    qp: u8,
) -> Result<std::result::Result<H264Stream, Overflow>> {
    let keyframe_interval = options.keyframe_interval_frames(fps);
    let config = EncoderConfig::new()
        // Skipped frames would break the frame count: never.
        .skip_frames(false)
        // Quality mode clipped to one QP is a constant quantiser: OpenH264's "off" mode ignores the
        // QP range and always uses 26. The bitrate is only a ceiling hint for the rate controller.
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps(100_000_000))
        .qp(QpRange::new(qp, qp))
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
        let bitstream = match encoder.encode_at(&yuv, Timestamp::from_millis(millis)) {
            Ok(bitstream) => bitstream,
            // OpenH264 has freed its context: this encoder is done either way.
            Err(error) if error.native_code() == NATIVE_OVERFLOW => {
                return Ok(Err(Overflow {
                    frame: index,
                    error,
                }))
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("H.264 encoding of frame {index} at QP {qp}")))
            }
        };
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
    Ok(Ok(stream))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Full-range noise, one byte per channel from a tiny deterministic generator.
    fn noise(width: usize, height: usize, count: usize) -> Frames {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let rgb = (0..width * height * 3 * count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as u8
            })
            .collect();
        Frames::from_rgb(rgb, width, height, count).unwrap()
    }

    #[test]
    fn noise_overflows_at_the_default_qp_and_is_retried_coarser() {
        let frames = noise(320, 192, 6);
        let fps = Rational { num: 24, den: 1 };
        let options = EncodeOptions::default();
        // The root cause: at QP 20 the first frame codes to more than the raw picture, which is all
        // the output buffer OpenH264 allocates.
        let Err(overflow) = encode_at_qp(&frames, fps, &options, options.h264_qp).unwrap() else {
            panic!("noise at QP 20 should overflow OpenH264's buffer");
        };
        assert_eq!(overflow.frame, 0);
        assert_eq!(overflow.error.native_code(), NATIVE_OVERFLOW);
        // `encode` retries coarser and keeps every frame.
        let stream = encode(&frames, fps, &options).unwrap();
        assert_eq!(stream.samples.len(), frames.len());
        assert!(stream.keyframes[0]);
        let decoded = decode(&[stream.sps, stream.pps], &stream.samples, 4).unwrap();
        assert_eq!(decoded.len(), frames.len());
        // At the coarsest quantiser anything fits.
        assert!(encode_at_qp(&frames, fps, &options, 51).unwrap().is_ok());
    }
}
