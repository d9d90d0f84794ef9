//! A minimal WebM (Matroska/EBML) muxer for one VP9 track, and a reader for `probe`.
//!
//! Layout written: EBML header, then a Segment of known size holding `SeekHead`, `Info` (1 ms
//! timestamps and the exact `Duration = frames / fps`), `Tracks` (with `DefaultDuration`, the
//! per-frame duration, so players and ffprobe derive the exact frame rate), one `Cluster` per
//! keyframe (at most 32.7 s each, the limit of a block's 16-bit relative timestamp) of
//! `SimpleBlock`s, and `Cues` pointing at every keyframe for seeking.
// Without the `webm` feature (no libvpx encoder) only the reader is used.
#![cfg_attr(not(feature = "webm"), allow(dead_code))]

use anyhow::{bail, ensure, Context, Result};

use crate::encode::Rational;

mod id {
    pub const EBML: u32 = 0x1A45_DFA3;
    pub const EBML_VERSION: u32 = 0x4286;
    pub const EBML_READ_VERSION: u32 = 0x42F7;
    pub const EBML_MAX_ID_LENGTH: u32 = 0x42F2;
    pub const EBML_MAX_SIZE_LENGTH: u32 = 0x42F3;
    pub const DOC_TYPE: u32 = 0x4282;
    pub const DOC_TYPE_VERSION: u32 = 0x4287;
    pub const DOC_TYPE_READ_VERSION: u32 = 0x4285;
    pub const SEGMENT: u32 = 0x1853_8067;
    pub const SEEK_HEAD: u32 = 0x114D_9B74;
    pub const SEEK: u32 = 0x4DBB;
    pub const SEEK_ID: u32 = 0x53AB;
    pub const SEEK_POSITION: u32 = 0x53AC;
    pub const INFO: u32 = 0x1549_A966;
    pub const TIMESTAMP_SCALE: u32 = 0x2A_D7B1;
    pub const DURATION: u32 = 0x4489;
    pub const MUXING_APP: u32 = 0x4D80;
    pub const WRITING_APP: u32 = 0x5741;
    pub const TRACKS: u32 = 0x1654_AE6B;
    pub const TRACK_ENTRY: u32 = 0xAE;
    pub const TRACK_NUMBER: u32 = 0xD7;
    pub const TRACK_UID: u32 = 0x73C5;
    pub const TRACK_TYPE: u32 = 0x83;
    pub const FLAG_LACING: u32 = 0x9C;
    pub const CODEC_ID: u32 = 0x86;
    pub const DEFAULT_DURATION: u32 = 0x23_E383;
    pub const VIDEO: u32 = 0xE0;
    pub const PIXEL_WIDTH: u32 = 0xB0;
    pub const PIXEL_HEIGHT: u32 = 0xBA;
    pub const COLOUR: u32 = 0x55B0;
    pub const MATRIX_COEFFICIENTS: u32 = 0x55B1;
    pub const RANGE: u32 = 0x55B9;
    pub const TRANSFER_CHARACTERISTICS: u32 = 0x55BA;
    pub const PRIMARIES: u32 = 0x55BB;
    pub const CLUSTER: u32 = 0x1F43_B675;
    pub const TIMESTAMP: u32 = 0xE7;
    pub const SIMPLE_BLOCK: u32 = 0xA3;
    pub const BLOCK_GROUP: u32 = 0xA0;
    pub const BLOCK: u32 = 0xA1;
    pub const CUES: u32 = 0x1C53_BB6B;
    pub const CUE_POINT: u32 = 0xBB;
    pub const CUE_TIME: u32 = 0xB3;
    pub const CUE_TRACK_POSITIONS: u32 = 0xB7;
    pub const CUE_TRACK: u32 = 0xF7;
    pub const CUE_CLUSTER_POSITION: u32 = 0xF1;
    pub const TAGS: u32 = 0x1254_C367;
    pub const ATTACHMENTS: u32 = 0x1941_A469;
    pub const CHAPTERS: u32 = 0x1043_A770;
}

/// Timestamps are in milliseconds (`TimestampScale` = 1 ms), as most WebM muxers write them.
const TIMESTAMP_SCALE_NS: u64 = 1_000_000;

fn put_id(out: &mut Vec<u8>, id: u32) {
    let bytes = id.to_be_bytes();
    let skip = bytes.iter().position(|&b| b != 0).unwrap_or(3);
    out.extend_from_slice(&bytes[skip..]);
}

/// EBML variable-length size, in the fewest bytes (all-ones patterns are reserved).
fn put_size(out: &mut Vec<u8>, size: u64) {
    let mut len = 1;
    while len < 8 && size >= (1u64 << (7 * len)) - 1 {
        len += 1;
    }
    let value = size | (1u64 << (7 * len));
    out.extend_from_slice(&value.to_be_bytes()[8 - len..]);
}

fn element(out: &mut Vec<u8>, id: u32, body: &[u8]) {
    put_id(out, id);
    put_size(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn uint(out: &mut Vec<u8>, id: u32, value: u64) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().position(|&b| b != 0).unwrap_or(7);
    element(out, id, &bytes[skip..]);
}

/// Unsigned integer in exactly 8 bytes, so an element's size does not depend on its value.
fn uint_fixed(out: &mut Vec<u8>, id: u32, value: u64) {
    element(out, id, &value.to_be_bytes());
}

fn nested(out: &mut Vec<u8>, id: u32, build: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    build(&mut body);
    element(out, id, &body);
}

/// Muxes a VP9 stream into a complete WebM file (in memory).
#[cfg(feature = "webm")]
pub fn mux(
    stream: &crate::vpx::Vp9Stream,
    width: u32,
    height: u32,
    fps: Rational,
) -> Result<Vec<u8>> {
    mux_packets(
        &stream.packets,
        &stream.keyframes,
        "V_VP9",
        width,
        height,
        fps,
    )
}

/// Muxes one video track of packets (one per frame, in display order) into WebM.
pub fn mux_packets(
    packets: &[Vec<u8>],
    keyframes: &[bool],
    codec_id: &str,
    width: u32,
    height: u32,
    fps: Rational,
) -> Result<Vec<u8>> {
    ensure!(
        !packets.is_empty() && packets.len() == keyframes.len(),
        "no packets to mux"
    );
    ensure!(keyframes[0], "a WebM stream must start with a keyframe");
    let frame_ms = |i: usize| -> u64 {
        // round(i * 1000 * den / num), in integers.
        let (num, den) = (fps.num as u128, fps.den as u128);
        ((2 * i as u128 * 1000 * den + num) / (2 * num)) as u64
    };

    let mut header = Vec::new();
    nested(&mut header, id::EBML, |b| {
        uint(b, id::EBML_VERSION, 1);
        uint(b, id::EBML_READ_VERSION, 1);
        uint(b, id::EBML_MAX_ID_LENGTH, 4);
        uint(b, id::EBML_MAX_SIZE_LENGTH, 8);
        element(b, id::DOC_TYPE, b"webm");
        uint(b, id::DOC_TYPE_VERSION, 4);
        uint(b, id::DOC_TYPE_READ_VERSION, 2);
    });

    let mut info = Vec::new();
    nested(&mut info, id::INFO, |b| {
        uint(b, id::TIMESTAMP_SCALE, TIMESTAMP_SCALE_NS);
        let duration_ms = packets.len() as f64 * 1000.0 * fps.den as f64 / fps.num as f64;
        element(b, id::DURATION, &duration_ms.to_be_bytes());
        let app = concat!("vidgen-media ", env!("CARGO_PKG_VERSION"));
        element(b, id::MUXING_APP, app.as_bytes());
        element(b, id::WRITING_APP, app.as_bytes());
    });

    let mut tracks = Vec::new();
    nested(&mut tracks, id::TRACKS, |b| {
        nested(b, id::TRACK_ENTRY, |t| {
            uint(t, id::TRACK_NUMBER, 1);
            uint(t, id::TRACK_UID, 1);
            uint(t, id::TRACK_TYPE, 1); // video
            uint(t, id::FLAG_LACING, 0);
            element(t, id::CODEC_ID, codec_id.as_bytes());
            let frame_ns =
                (2 * 1_000_000_000u64 * fps.den as u64 + fps.num as u64) / (2 * fps.num as u64);
            uint(t, id::DEFAULT_DURATION, frame_ns);
            nested(t, id::VIDEO, |v| {
                uint(v, id::PIXEL_WIDTH, width as u64);
                uint(v, id::PIXEL_HEIGHT, height as u64);
                // BT.709, broadcast range: matches the conversion in yuv.rs.
                nested(v, id::COLOUR, |c| {
                    uint(c, id::MATRIX_COEFFICIENTS, 1);
                    uint(c, id::RANGE, 1);
                    uint(c, id::TRANSFER_CHARACTERISTICS, 1);
                    uint(c, id::PRIMARIES, 1);
                });
            });
        });
    });

    // Clusters: a new one at every keyframe, or when the 16-bit relative timestamp would overflow.
    let mut clusters: Vec<(u64, Vec<u8>, bool)> = Vec::new(); // (timestamp, blocks, starts with key)
    for (i, packet) in packets.iter().enumerate() {
        let t = frame_ms(i);
        let start_new = match clusters.last() {
            None => true,
            Some((start, _, _)) => keyframes[i] || t - start > i16::MAX as u64,
        };
        if start_new {
            clusters.push((t, Vec::new(), keyframes[i]));
        }
        let (start, blocks, _) = clusters.last_mut().expect("a cluster was just pushed");
        let mut block = Vec::with_capacity(packet.len() + 4);
        block.push(0x81); // track number 1 as a 1-byte vint
        block.extend_from_slice(&((t - *start) as i16).to_be_bytes());
        block.push(if keyframes[i] { 0x80 } else { 0 });
        block.extend_from_slice(packet);
        element(blocks, id::SIMPLE_BLOCK, &block);
    }
    let mut cluster_bytes = Vec::new();
    let mut cluster_offsets = Vec::new(); // relative to the start of the clusters area
    for (t, blocks, _) in &clusters {
        cluster_offsets.push(cluster_bytes.len() as u64);
        nested(&mut cluster_bytes, id::CLUSTER, |c| {
            uint(c, id::TIMESTAMP, *t);
            c.extend_from_slice(blocks);
        });
    }

    // Positions inside the Segment depend on the SeekHead's size, which (with fixed-width
    // positions) does not depend on their values: size it with zeros first.
    let seek_head = |info_pos: u64, tracks_pos: u64, cues_pos: u64| {
        let mut out = Vec::new();
        nested(&mut out, id::SEEK_HEAD, |s| {
            for (target, pos) in [
                (id::INFO, info_pos),
                (id::TRACKS, tracks_pos),
                (id::CUES, cues_pos),
            ] {
                nested(s, id::SEEK, |e| {
                    let mut target_id = Vec::new();
                    put_id(&mut target_id, target);
                    element(e, id::SEEK_ID, &target_id);
                    uint_fixed(e, id::SEEK_POSITION, pos);
                });
            }
        });
        out
    };
    let seek_len = seek_head(0, 0, 0).len() as u64;
    let info_pos = seek_len;
    let tracks_pos = info_pos + info.len() as u64;
    let clusters_pos = tracks_pos + tracks.len() as u64;
    let cues_pos = clusters_pos + cluster_bytes.len() as u64;
    let mut cues = Vec::new();
    nested(&mut cues, id::CUES, |c| {
        for ((t, _, key), offset) in clusters.iter().zip(&cluster_offsets) {
            if !key {
                continue;
            }
            nested(c, id::CUE_POINT, |p| {
                uint(p, id::CUE_TIME, *t);
                nested(p, id::CUE_TRACK_POSITIONS, |tp| {
                    uint(tp, id::CUE_TRACK, 1);
                    uint(tp, id::CUE_CLUSTER_POSITION, clusters_pos + offset);
                });
            });
        }
    });

    let segment_len = cues_pos + cues.len() as u64;
    let mut out = header;
    put_id(&mut out, id::SEGMENT);
    put_size(&mut out, segment_len);
    out.extend(seek_head(info_pos, tracks_pos, cues_pos));
    out.extend(info);
    out.extend(tracks);
    out.extend(cluster_bytes);
    out.extend(cues);
    Ok(out)
}

/// The first video track of a WebM/Matroska file, as `probe` needs it.
#[derive(Clone, Debug)]
pub struct WebmVideo {
    /// Matroska codec ID: `V_VP9`, `V_VP8`, `V_AV1`, ...
    pub codec_id: String,
    pub width: u32,
    pub height: u32,
    /// `Info/Duration` in seconds, when present.
    pub duration_s: Option<f64>,
    /// `DefaultDuration` in nanoseconds, when present.
    pub default_duration_ns: Option<u64>,
    /// Block timestamps in seconds, in file order.
    pub timestamps_s: Vec<f64>,
    /// Frame payloads, in file order.
    pub packets: Vec<Vec<u8>>,
    pub keyframes: Vec<bool>,
}

/// Reads one EBML element header at `pos`: (id, data start, data size or `None` for unknown).
fn read_header(data: &[u8], pos: usize) -> Result<(u32, usize, Option<u64>)> {
    let first = *data.get(pos).context("EBML: unexpected end of file")?;
    let id_len = first.leading_zeros() as usize + 1;
    ensure!(id_len <= 4, "EBML: invalid element ID at byte {pos}");
    let id_bytes = data
        .get(pos..pos + id_len)
        .context("EBML: truncated element ID")?;
    let id = id_bytes.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32);
    let size_pos = pos + id_len;
    let first = *data.get(size_pos).context("EBML: truncated element size")?;
    let size_len = first.leading_zeros() as usize + 1;
    ensure!(
        size_len <= 8,
        "EBML: invalid element size at byte {size_pos}"
    );
    let size_bytes = data
        .get(size_pos..size_pos + size_len)
        .context("EBML: truncated element size")?;
    let mut size = (first as u64) & (0xff >> size_len);
    for &b in &size_bytes[1..] {
        size = (size << 8) | b as u64;
    }
    let unknown = size == (1u64 << (7 * size_len)) - 1;
    Ok((
        id,
        size_pos + size_len,
        if unknown { None } else { Some(size) },
    ))
}

fn read_uint(body: &[u8]) -> u64 {
    body.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64)
}

fn read_float(body: &[u8]) -> Option<f64> {
    match body.len() {
        4 => Some(f32::from_be_bytes(body.try_into().ok()?) as f64),
        8 => Some(f64::from_be_bytes(body.try_into().ok()?)),
        _ => None,
    }
}

/// Iterates the children of a known-size element body: (id, body).
fn elements(body: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8])>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= body.len() {
            return None;
        }
        let item = read_header(body, pos).and_then(|(id, start, size)| {
            let size = size.context("EBML: unknown size inside a sized element")? as usize;
            let child = body
                .get(start..start + size)
                .context("EBML: element runs past its parent")?;
            pos = start + size;
            Ok((id, child))
        });
        if item.is_err() {
            pos = body.len();
        }
        Some(item)
    })
}

const TOP_LEVEL: [u32; 8] = [
    id::SEEK_HEAD,
    id::INFO,
    id::TRACKS,
    id::CLUSTER,
    id::CUES,
    id::TAGS,
    id::ATTACHMENTS,
    id::CHAPTERS,
];

impl WebmVideo {
    pub fn parse(data: &[u8]) -> Result<Self> {
        let (ebml, start, size) = read_header(data, 0)?;
        ensure!(
            ebml == id::EBML,
            "not a WebM/Matroska file (no EBML header)"
        );
        let size = size.context("EBML header of unknown size")? as usize;
        let header = data
            .get(start..start + size)
            .context("EBML header is truncated")?;
        let mut doc_type = String::new();
        for child in elements(header) {
            let (cid, body) = child?;
            if cid == id::DOC_TYPE {
                doc_type = String::from_utf8_lossy(body)
                    .trim_end_matches('\0')
                    .to_string();
            }
        }
        ensure!(
            doc_type == "webm" || doc_type == "matroska",
            "EBML document type {doc_type:?} is not webm or matroska"
        );
        let (segment, seg_start, seg_size) = read_header(data, start + size)?;
        ensure!(
            segment == id::SEGMENT,
            "WebM: no Segment after the EBML header"
        );
        let seg_end = seg_size.map_or(data.len(), |s| (seg_start + s as usize).min(data.len()));

        let mut video = WebmVideo {
            codec_id: String::new(),
            width: 0,
            height: 0,
            duration_s: None,
            default_duration_ns: None,
            timestamps_s: Vec::new(),
            packets: Vec::new(),
            keyframes: Vec::new(),
        };
        let mut timestamp_scale = TIMESTAMP_SCALE_NS;
        let mut duration_ticks = None;
        let mut track_number = None;
        let mut pos = seg_start;
        while pos < seg_end {
            let (eid, body_start, size) = read_header(data, pos)?;
            let body_end = match size {
                Some(s) => body_start + s as usize,
                // Unknown size (live streams): the element ends where the next top-level one starts.
                None => scan_unknown(data, body_start, seg_end)?,
            };
            ensure!(
                body_end <= data.len(),
                "WebM element at byte {pos} is truncated"
            );
            let body = &data[body_start..body_end];
            match eid {
                id::INFO => {
                    for child in elements(body) {
                        let (cid, b) = child?;
                        match cid {
                            id::TIMESTAMP_SCALE => timestamp_scale = read_uint(b),
                            id::DURATION => duration_ticks = read_float(b),
                            _ => {}
                        }
                    }
                }
                id::TRACKS => {
                    for child in elements(body) {
                        let (cid, entry) = child?;
                        if cid == id::TRACK_ENTRY && track_number.is_none() {
                            track_number = video.read_track(entry)?;
                        }
                    }
                }
                id::CLUSTER => {
                    let track =
                        track_number.context("WebM: a Cluster comes before the video track")?;
                    video.read_cluster(body, track, timestamp_scale)?;
                }
                _ => {}
            }
            pos = body_end;
        }
        ensure!(track_number.is_some(), "WebM file has no video track");
        video.duration_s = duration_ticks.map(|d| d * timestamp_scale as f64 / 1e9);
        Ok(video)
    }

    /// Reads a TrackEntry; returns its track number when it is a video track.
    fn read_track(&mut self, entry: &[u8]) -> Result<Option<u64>> {
        let (mut number, mut kind) = (None, 0);
        let (mut codec, mut default_duration, mut size) = (String::new(), None, (0, 0));
        for child in elements(entry) {
            let (cid, b) = child?;
            match cid {
                id::TRACK_NUMBER => number = Some(read_uint(b)),
                id::TRACK_TYPE => kind = read_uint(b),
                id::CODEC_ID => codec = String::from_utf8_lossy(b).to_string(),
                id::DEFAULT_DURATION => default_duration = Some(read_uint(b)),
                id::VIDEO => {
                    for v in elements(b) {
                        let (vid, vb) = v?;
                        match vid {
                            id::PIXEL_WIDTH => size.0 = read_uint(vb) as u32,
                            id::PIXEL_HEIGHT => size.1 = read_uint(vb) as u32,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if kind != 1 {
            return Ok(None);
        }
        self.codec_id = codec;
        self.default_duration_ns = default_duration;
        (self.width, self.height) = size;
        Ok(Some(number.context("WebM video track has no TrackNumber")?))
    }

    fn read_cluster(&mut self, body: &[u8], track: u64, timestamp_scale: u64) -> Result<()> {
        let mut cluster_time = 0u64;
        for child in elements(body) {
            let (cid, b) = child?;
            match cid {
                id::TIMESTAMP => cluster_time = read_uint(b),
                id::SIMPLE_BLOCK => {
                    self.read_block(b, track, cluster_time, timestamp_scale, None)?
                }
                id::BLOCK_GROUP => {
                    for g in elements(b) {
                        let (gid, gb) = g?;
                        if gid == id::BLOCK {
                            // A Block carries no keyframe flag; a BlockGroup without
                            // ReferenceBlock is a keyframe.
                            let referenced = elements(b).any(|e| matches!(e, Ok((0xFB, _))));
                            self.read_block(
                                gb,
                                track,
                                cluster_time,
                                timestamp_scale,
                                Some(!referenced),
                            )?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn read_block(
        &mut self,
        block: &[u8],
        track: u64,
        cluster_time: u64,
        timestamp_scale: u64,
        keyframe: Option<bool>,
    ) -> Result<()> {
        let first = *block.first().context("WebM: empty block")?;
        let len = first.leading_zeros() as usize + 1;
        ensure!(len <= 8 && block.len() >= len + 3, "WebM: malformed block");
        // Track number: a vint; masking below the marker bit drops it.
        let number = read_uint(&block[..len]) & ((1u64 << (7 * len)) - 1);
        if number != track {
            return Ok(());
        }
        let relative = i16::from_be_bytes([block[len], block[len + 1]]) as i64;
        let flags = block[len + 2];
        if flags & 0x06 != 0 {
            bail!("WebM: laced video blocks are not supported");
        }
        let ticks = cluster_time as i64 + relative;
        self.timestamps_s
            .push(ticks as f64 * timestamp_scale as f64 / 1e9);
        self.keyframes.push(keyframe.unwrap_or(flags & 0x80 != 0));
        self.packets.push(block[len + 3..].to_vec());
        Ok(())
    }
}

/// End of an unknown-size element starting its body at `start`: the first top-level element
/// (or the end of the segment) found by walking its children.
fn scan_unknown(data: &[u8], start: usize, end: usize) -> Result<usize> {
    let mut pos = start;
    while pos < end {
        let (eid, body_start, size) = read_header(data, pos)?;
        if TOP_LEVEL.contains(&eid) {
            return Ok(pos);
        }
        let size = size.context("WebM: nested element of unknown size")?;
        pos = body_start + size as usize;
    }
    Ok(end.min(data.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vint_sizes() {
        let enc = |n: u64| {
            let mut v = Vec::new();
            put_size(&mut v, n);
            v
        };
        assert_eq!(enc(0), vec![0x80]);
        assert_eq!(enc(126), vec![0xFE]);
        assert_eq!(enc(127), vec![0x40, 0x7F]); // 0xFF would mean "unknown"
        assert_eq!(enc(16382), vec![0x7F, 0xFE]);
        for n in [0u64, 1, 126, 127, 128, 16382, 16383, 1 << 20, 1 << 40] {
            let mut buf = vec![0x42, 0x86];
            put_size(&mut buf, n);
            let (id, _, size) = read_header(&buf, 0).unwrap();
            assert_eq!((id, size), (0x4286, Some(n)));
        }
    }

    #[test]
    fn mux_then_parse_round_trips() {
        let fps = Rational { num: 24, den: 1 };
        let packets: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 10 + i as usize]).collect();
        let keys: Vec<bool> = (0..50).map(|i| i % 20 == 0).collect();
        let file = mux_packets(&packets, &keys, "V_VP9", 333, 201, fps).unwrap();
        let v = WebmVideo::parse(&file).unwrap();
        assert_eq!(
            (v.codec_id.as_str(), v.width, v.height),
            ("V_VP9", 333, 201)
        );
        assert_eq!(v.packets, packets);
        assert_eq!(v.keyframes, keys);
        assert_eq!(v.default_duration_ns, Some(41_666_667));
        assert!((v.duration_s.unwrap() - 50.0 / 24.0).abs() < 1e-9);
        assert!((v.timestamps_s[49] - 2.042).abs() < 1e-9); // round(49000/24) ms
    }
}
