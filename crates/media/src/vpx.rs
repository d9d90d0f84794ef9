//! VP9 through libvpx, via the C layer in `csrc/vpx_shim.c`.

use std::ffi::{c_char, c_int, CStr};
use std::ptr::{null, NonNull};

use anyhow::{bail, ensure, Result};

use crate::encode::{EncodeOptions, Rational};
use crate::yuv::{Yuv420, YuvPlanes};
use crate::Frames;

#[repr(C)]
struct RawEncoder {
    _private: [u8; 0],
}

#[repr(C)]
struct RawDecoder {
    _private: [u8; 0],
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn vg_vp9_enc_open(
        width: c_int,
        height: c_int,
        fps_num: c_int,
        fps_den: c_int,
        threads: c_int,
        cq_level: c_int,
        cpu_used: c_int,
        keyframe_interval: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawEncoder;
    #[allow(clippy::too_many_arguments)]
    fn vg_vp9_enc_encode(
        enc: *mut RawEncoder,
        y: *const u8,
        u: *const u8,
        v: *const u8,
        y_stride: c_int,
        uv_stride: c_int,
        pts: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn vg_vp9_enc_next_packet(
        enc: *mut RawEncoder,
        data: *mut *const u8,
        len: *mut usize,
        pts: *mut i64,
        flags: *mut c_int,
    ) -> c_int;
    fn vg_vp9_enc_close(enc: *mut RawEncoder);
    fn vg_vp9_dec_open(threads: c_int, err: *mut c_char, err_len: usize) -> *mut RawDecoder;
    fn vg_vp9_dec_decode(
        dec: *mut RawDecoder,
        data: *const u8,
        len: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn vg_vp9_dec_next_frame(
        dec: *mut RawDecoder,
        y: *mut *const u8,
        u: *mut *const u8,
        v: *mut *const u8,
        y_stride: *mut c_int,
        uv_stride: *mut c_int,
        width: *mut c_int,
        height: *mut c_int,
    ) -> c_int;
    fn vg_vp9_dec_close(dec: *mut RawDecoder);
}

/// Error text buffer the C layer fills.
struct ErrBuf([c_char; 512]);

impl ErrBuf {
    fn new() -> Self {
        Self([0; 512])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn message(&self) -> String {
        // SAFETY: the buffer is zero-initialised and the C side writes with snprintf, which always
        // NUL-terminates within the given length.
        unsafe { CStr::from_ptr(self.0.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
}

/// A VP9 stream: one packet per shown frame (libvpx packs hidden alt-ref frames into superframes).
pub struct Vp9Stream {
    pub packets: Vec<Vec<u8>>,
    pub keyframes: Vec<bool>,
}

struct EncoderHandle(NonNull<RawEncoder>);

impl Drop for EncoderHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from vg_vp9_enc_open and is closed once.
        unsafe { vg_vp9_enc_close(self.0.as_ptr()) }
    }
}

pub fn encode(frames: &Frames, fps: Rational, options: &EncodeOptions) -> Result<Vp9Stream> {
    let (width, height) = (frames.width(), frames.height());
    let mut err = ErrBuf::new();
    // SAFETY: plain integer arguments and a valid error buffer.
    let raw = unsafe {
        vg_vp9_enc_open(
            width as c_int,
            height as c_int,
            fps.num as c_int,
            fps.den as c_int,
            options.thread_count().min(64) as c_int,
            options.vp9_cq_level as c_int,
            options.vp9_speed as c_int,
            options.keyframe_interval_frames(fps) as c_int,
            err.ptr(),
            512,
        )
    };
    let Some(raw) = NonNull::new(raw) else {
        bail!("initialising the VP9 encoder: {}", err.message());
    };
    let encoder = EncoderHandle(raw);
    let mut stream = Vp9Stream {
        packets: Vec::new(),
        keyframes: Vec::new(),
    };
    let collect = |stream: &mut Vp9Stream| -> Result<()> {
        let (mut data, mut len, mut pts, mut flags) = (null(), 0usize, 0i64, 0 as c_int);
        // SAFETY: out-pointers are valid; the packet buffer stays valid until the next encode call,
        // and it is copied before that.
        while unsafe {
            vg_vp9_enc_next_packet(
                encoder.0.as_ptr(),
                &mut data,
                &mut len,
                &mut pts,
                &mut flags,
            )
        } == 1
        {
            ensure!(
                flags & 2 == 0,
                "VP9 encoder emitted a hidden frame outside a superframe; the frame count would be wrong"
            );
            ensure!(
                pts == stream.packets.len() as i64,
                "VP9 encoder returned frame {pts} where frame {} was due",
                stream.packets.len()
            );
            // SAFETY: libvpx guarantees `len` readable bytes at `data`.
            stream
                .packets
                .push(unsafe { std::slice::from_raw_parts(data, len) }.to_vec());
            stream.keyframes.push(flags & 1 != 0);
        }
        Ok(())
    };
    for index in 0..frames.len() {
        let yuv = Yuv420::from_frame(frames, index);
        // SAFETY: the planes hold height × stride (chroma: ceil(h/2) × ceil(w/2)) bytes.
        let rc = unsafe {
            vg_vp9_enc_encode(
                encoder.0.as_ptr(),
                yuv.y.as_ptr(),
                yuv.u.as_ptr(),
                yuv.v.as_ptr(),
                width as c_int,
                yuv.chroma_width() as c_int,
                index as i64,
                err.ptr(),
                512,
            )
        };
        ensure!(rc == 0, "VP9 encoding of frame {index}: {}", err.message());
        collect(&mut stream)?;
    }
    loop {
        let before = stream.packets.len();
        // SAFETY: null planes ask the encoder to flush.
        let rc = unsafe {
            vg_vp9_enc_encode(
                encoder.0.as_ptr(),
                null(),
                null(),
                null(),
                0,
                0,
                -1,
                err.ptr(),
                512,
            )
        };
        ensure!(rc == 0, "flushing the VP9 encoder: {}", err.message());
        collect(&mut stream)?;
        if stream.packets.len() == before {
            break;
        }
    }
    ensure!(
        stream.packets.len() == frames.len(),
        "VP9 encoder returned {} frames for {} inputs",
        stream.packets.len(),
        frames.len()
    );
    Ok(stream)
}

struct DecoderHandle(NonNull<RawDecoder>);

impl Drop for DecoderHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from vg_vp9_dec_open and is closed once.
        unsafe { vg_vp9_dec_close(self.0.as_ptr()) }
    }
}

/// Decodes VP9 packets (one per frame) to RGB frames.
pub fn decode(packets: &[Vec<u8>]) -> Result<Frames> {
    let mut err = ErrBuf::new();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    // SAFETY: valid error buffer.
    let raw = unsafe { vg_vp9_dec_open(threads as c_int, err.ptr(), 512) };
    let Some(raw) = NonNull::new(raw) else {
        bail!("initialising the VP9 decoder: {}", err.message());
    };
    let decoder = DecoderHandle(raw);
    let mut rgb = Vec::new();
    let mut size: Option<(usize, usize)> = None;
    let mut count = 0;
    let mut drain = |rgb: &mut Vec<u8>| -> Result<()> {
        loop {
            let (mut y, mut u, mut v) = (null(), null(), null());
            let (mut ys, mut uvs, mut w, mut h) = (0, 0, 0, 0);
            // SAFETY: out-pointers are valid; the picture stays valid until the next decode call.
            let rc = unsafe {
                vg_vp9_dec_next_frame(
                    decoder.0.as_ptr(),
                    &mut y,
                    &mut u,
                    &mut v,
                    &mut ys,
                    &mut uvs,
                    &mut w,
                    &mut h,
                )
            };
            match rc {
                0 => return Ok(()),
                1 => {}
                _ => bail!(
                    "VP9 picture is not 8-bit 4:2:0; this build only judges 8-bit 4:2:0 video"
                ),
            }
            let (width, height) = (w as usize, h as usize);
            if *size.get_or_insert((width, height)) != (width, height) {
                bail!("VP9 stream changes size mid-stream");
            }
            let (ys, uvs) = (ys as usize, uvs as usize);
            let ch = height.div_ceil(2);
            // SAFETY: libvpx's planes hold `height` rows of `stride` bytes (chroma: ceil(h/2) rows).
            let planes = unsafe {
                YuvPlanes {
                    width,
                    height,
                    y: std::slice::from_raw_parts(y, ys * (height - 1) + width),
                    u: std::slice::from_raw_parts(u, uvs * (ch - 1) + width.div_ceil(2)),
                    v: std::slice::from_raw_parts(v, uvs * (ch - 1) + width.div_ceil(2)),
                    y_stride: ys,
                    uv_stride: uvs,
                }
            };
            planes.append_rgb(rgb);
            count += 1;
        }
    };
    for (index, packet) in packets.iter().enumerate() {
        // SAFETY: the packet slice is valid for its length.
        let rc = unsafe {
            vg_vp9_dec_decode(
                decoder.0.as_ptr(),
                packet.as_ptr(),
                packet.len(),
                err.ptr(),
                512,
            )
        };
        ensure!(rc == 0, "decoding VP9 frame {index}: {}", err.message());
        drain(&mut rgb)?;
    }
    // SAFETY: a null packet flushes the decoder.
    let rc = unsafe { vg_vp9_dec_decode(decoder.0.as_ptr(), null(), 0, err.ptr(), 512) };
    ensure!(rc == 0, "flushing the VP9 decoder: {}", err.message());
    drain(&mut rgb)?;
    let (width, height) =
        size.ok_or_else(|| anyhow::anyhow!("VP9 stream decoded to no pictures"))?;
    Frames::from_rgb(rgb, width, height, count)
}
