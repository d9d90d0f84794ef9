//! A minimal ISO-BMFF (MP4) muxer for one H.264 track, and a reader for `probe`.
//!
//! Layout written: `ftyp`, `moov` (before the media data, so a browser can start playing while the
//! file downloads), then one `mdat` holding every sample as a single chunk. The media timescale is
//! `fps_num * 1000` (just `fps_num` when that is already ≥ 1000) and every sample lasts
//! `fps_den * 1000` (or `fps_den`) ticks, so the duration is exactly `frames / fps`. OpenH264 makes
//! no B-frames, so no `ctts` or edit list is needed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::encode::Rational;
use crate::h264::H264Stream;

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

fn full_box(kind: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(body.len() + 4);
    inner.extend_from_slice(&((version as u32) << 24 | (flags & 0x00ff_ffff)).to_be_bytes());
    inner.extend_from_slice(body);
    mp4_box(kind, &inner)
}

/// Appends big-endian integers (u8/u16/u32/u64 given as (value, bytes)).
fn put(out: &mut Vec<u8>, value: u64, bytes: usize) {
    out.extend_from_slice(&value.to_be_bytes()[8 - bytes..]);
}

/// Media timescale and per-frame duration in its ticks (see the module docs).
pub fn timescale(fps: Rational) -> (u32, u32) {
    let scale = if fps.num >= 1000 { 1 } else { 1000 };
    (fps.num * scale, fps.den * scale)
}

/// Muxes an encoded stream into a complete MP4 file (in memory).
pub fn mux(stream: &H264Stream, width: u32, height: u32, fps: Rational) -> Result<Vec<u8>> {
    let count = stream.samples.len();
    ensure!(count > 0, "no samples to mux");
    let (timescale, delta) = timescale(fps);
    let duration = count as u64 * delta as u64;
    ensure!(
        duration <= u32::MAX as u64,
        "video too long for a version-0 MP4 header"
    );
    let duration = duration as u32;
    let payload: u64 = stream.samples.iter().map(|s| s.len() as u64).sum();
    let large = payload + 8 > u32::MAX as u64;

    let ftyp = {
        let mut b = Vec::new();
        b.extend_from_slice(b"isom");
        put(&mut b, 0x200, 4);
        for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
            b.extend_from_slice(brand);
        }
        mp4_box(b"ftyp", &b)
    };

    // moov's size does not depend on the chunk offset's value, so build it once with a
    // placeholder, then again with the real offset.
    let build_moov = |chunk_offset: u64| -> Vec<u8> {
        let stbl = {
            let mut b = Vec::new();
            b.extend(sample_description(stream, width, height));
            let mut stts = Vec::new();
            put(&mut stts, 1, 4);
            put(&mut stts, count as u64, 4);
            put(&mut stts, delta as u64, 4);
            b.extend(full_box(b"stts", 0, 0, &stts));
            let keys: Vec<usize> = (0..count).filter(|&i| stream.keyframes[i]).collect();
            let mut stss = Vec::new();
            put(&mut stss, keys.len() as u64, 4);
            for k in keys {
                put(&mut stss, k as u64 + 1, 4);
            }
            b.extend(full_box(b"stss", 0, 0, &stss));
            let mut stsc = Vec::new();
            for v in [1, 1, count as u64, 1] {
                put(&mut stsc, v, 4);
            }
            b.extend(full_box(b"stsc", 0, 0, &stsc));
            let mut stsz = Vec::new();
            put(&mut stsz, 0, 4);
            put(&mut stsz, count as u64, 4);
            for s in &stream.samples {
                put(&mut stsz, s.len() as u64, 4);
            }
            b.extend(full_box(b"stsz", 0, 0, &stsz));
            let mut stco = Vec::new();
            put(&mut stco, 1, 4);
            if large {
                put(&mut stco, chunk_offset, 8);
                b.extend(full_box(b"co64", 0, 0, &stco));
            } else {
                put(&mut stco, chunk_offset, 4);
                b.extend(full_box(b"stco", 0, 0, &stco));
            }
            mp4_box(b"stbl", &b)
        };
        let minf = {
            let mut b = full_box(b"vmhd", 0, 1, &[0; 8]);
            let url = full_box(b"url ", 0, 1, &[]);
            let mut dref = Vec::new();
            put(&mut dref, 1, 4);
            dref.extend(url);
            b.extend(mp4_box(b"dinf", &full_box(b"dref", 0, 0, &dref)));
            b.extend(stbl);
            mp4_box(b"minf", &b)
        };
        let mdia = {
            let mut mdhd = Vec::new();
            put(&mut mdhd, 0, 4); // creation time
            put(&mut mdhd, 0, 4); // modification time
            put(&mut mdhd, timescale as u64, 4);
            put(&mut mdhd, duration as u64, 4);
            put(&mut mdhd, 0x55c4, 2); // language "und"
            put(&mut mdhd, 0, 2);
            let mut b = full_box(b"mdhd", 0, 0, &mdhd);
            let mut hdlr = Vec::new();
            put(&mut hdlr, 0, 4);
            hdlr.extend_from_slice(b"vide");
            hdlr.extend_from_slice(&[0; 12]);
            hdlr.extend_from_slice(b"VideoHandler\0");
            b.extend(full_box(b"hdlr", 0, 0, &hdlr));
            b.extend(minf);
            mp4_box(b"mdia", &b)
        };
        let mut tkhd = Vec::new();
        put(&mut tkhd, 0, 4);
        put(&mut tkhd, 0, 4);
        put(&mut tkhd, 1, 4); // track id
        put(&mut tkhd, 0, 4);
        put(&mut tkhd, duration as u64, 4); // in the movie timescale, which equals the media one
        tkhd.extend_from_slice(&[0; 8]);
        put(&mut tkhd, 0, 2); // layer
        put(&mut tkhd, 0, 2); // alternate group
        put(&mut tkhd, 0, 2); // volume: none for video
        put(&mut tkhd, 0, 2);
        for m in MATRIX {
            put(&mut tkhd, m as u64, 4);
        }
        put(&mut tkhd, (width as u64) << 16, 4);
        put(&mut tkhd, (height as u64) << 16, 4);
        let mut trak = full_box(b"tkhd", 0, 3, &tkhd);
        trak.extend(mdia);
        let trak = mp4_box(b"trak", &trak);

        let mut mvhd = Vec::new();
        put(&mut mvhd, 0, 4);
        put(&mut mvhd, 0, 4);
        put(&mut mvhd, timescale as u64, 4);
        put(&mut mvhd, duration as u64, 4);
        put(&mut mvhd, 0x0001_0000, 4); // rate 1.0
        put(&mut mvhd, 0x0100, 2); // volume 1.0
        mvhd.extend_from_slice(&[0; 10]);
        for m in MATRIX {
            put(&mut mvhd, m as u64, 4);
        }
        mvhd.extend_from_slice(&[0; 24]);
        put(&mut mvhd, 2, 4); // next track id
        let mut moov = full_box(b"mvhd", 0, 0, &mvhd);
        moov.extend(trak);
        mp4_box(b"moov", &moov)
    };
    let mdat_header = if large { 16 } else { 8 };
    let moov_len = build_moov(0).len() as u64;
    let moov = build_moov(ftyp.len() as u64 + moov_len + mdat_header);

    let mut out =
        Vec::with_capacity((ftyp.len() as u64 + moov_len + mdat_header + payload) as usize);
    out.extend(ftyp);
    out.extend(moov);
    if large {
        put(&mut out, 1, 4);
        out.extend_from_slice(b"mdat");
        put(&mut out, payload + 16, 8);
    } else {
        put(&mut out, payload + 8, 4);
        out.extend_from_slice(b"mdat");
    }
    for s in &stream.samples {
        out.extend_from_slice(s);
    }
    Ok(out)
}

fn sample_description(stream: &H264Stream, width: u32, height: u32) -> Vec<u8> {
    let mut avcc = vec![1, stream.sps[1], stream.sps[2], stream.sps[3], 0xff, 0xe1];
    put(&mut avcc, stream.sps.len() as u64, 2);
    avcc.extend_from_slice(&stream.sps);
    avcc.push(1);
    put(&mut avcc, stream.pps.len() as u64, 2);
    avcc.extend_from_slice(&stream.pps);

    let mut entry = vec![0; 6];
    put(&mut entry, 1, 2); // data reference index
    entry.extend_from_slice(&[0; 16]);
    put(&mut entry, width as u64, 2);
    put(&mut entry, height as u64, 2);
    put(&mut entry, 0x0048_0000, 4); // 72 dpi
    put(&mut entry, 0x0048_0000, 4);
    put(&mut entry, 0, 4);
    put(&mut entry, 1, 2); // frames per sample
    let mut name = [0u8; 32];
    let label = b"vidgen OpenH264";
    name[0] = label.len() as u8;
    name[1..=label.len()].copy_from_slice(label);
    entry.extend_from_slice(&name);
    put(&mut entry, 0x18, 2); // depth
    put(&mut entry, 0xffff, 2);
    entry.extend(mp4_box(b"avcC", &avcc));
    // BT.709, limited range: matches the conversion in yuv.rs and the SPS VUI.
    let mut colr = b"nclx".to_vec();
    for v in [1, 1, 1] {
        put(&mut colr, v, 2);
    }
    colr.push(0);
    entry.extend(mp4_box(b"colr", &colr));
    entry.extend(mp4_box(b"pasp", &[0, 0, 0, 1, 0, 0, 0, 1]));
    let avc1 = mp4_box(b"avc1", &entry);
    let mut stsd = Vec::new();
    put(&mut stsd, 1, 4);
    stsd.extend(avc1);
    full_box(b"stsd", 0, 0, &stsd)
}

/// The first video track of an MP4 file, as `probe` needs it.
#[derive(Clone, Debug)]
pub struct Mp4Video {
    /// Sample entry type: `avc1`, `avc3`, `hvc1`, `av01`, ...
    pub codec_tag: String,
    pub width: u32,
    pub height: u32,
    pub timescale: u32,
    /// Track media duration in `timescale` ticks.
    pub duration: u64,
    /// Per-sample durations in ticks (from `stts`).
    pub sample_durations: Vec<u32>,
    pub sample_sizes: Vec<u32>,
    pub sample_offsets: Vec<u64>,
    /// 0-based indices of sync samples; `None` when `stss` is absent (every sample is a sync one).
    pub sync_samples: Option<Vec<usize>>,
    /// `avcC`: SPS and PPS NAL units, and the NAL length size in bytes.
    pub sps: Vec<Vec<u8>>,
    pub pps: Vec<Vec<u8>>,
    pub nal_length_size: usize,
    /// True when `moov` comes before `mdat` (playback can start before the download ends).
    pub fast_start: bool,
}

impl Mp4Video {
    /// Reads the container structure (not the samples) of `path`.
    pub fn open(path: &Path) -> Result<(Self, File)> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut pos = 0u64;
        let mut moov = None;
        let mut mdat_seen = false;
        let mut fast_start = false;
        while pos + 8 <= file_len {
            file.seek(SeekFrom::Start(pos))?;
            let mut header = [0u8; 16];
            file.read_exact(&mut header[..8])?;
            let mut size = u32::from_be_bytes(header[..4].try_into().unwrap()) as u64;
            let kind: [u8; 4] = header[4..8].try_into().unwrap();
            let mut header_len = 8;
            if size == 1 {
                file.read_exact(&mut header[8..16])?;
                size = u64::from_be_bytes(header[8..16].try_into().unwrap());
                header_len = 16;
            } else if size == 0 {
                size = file_len - pos;
            }
            ensure!(
                size >= header_len && pos + size <= file_len,
                "MP4 box {:?} at {pos} is truncated",
                ascii(&kind)
            );
            match &kind {
                b"moov" => {
                    ensure!(
                        size <= 256 << 20,
                        "MP4 moov box of {size} bytes is implausibly large"
                    );
                    let mut body = vec![0; (size - header_len) as usize];
                    file.read_exact(&mut body)?;
                    fast_start = !mdat_seen;
                    moov = Some(body);
                }
                b"mdat" => mdat_seen = true,
                _ => {}
            }
            pos += size;
        }
        let moov = moov.context("no moov box: not an MP4 file, or an unfinished one")?;
        let mut video = parse_moov(&moov)?;
        video.fast_start = fast_start;
        Ok((video, file))
    }

    /// Reads every sample's bytes.
    pub fn read_samples(&self, file: &mut File) -> Result<Vec<Vec<u8>>> {
        self.sample_offsets
            .iter()
            .zip(&self.sample_sizes)
            .enumerate()
            .map(|(i, (&offset, &size))| {
                let mut buf = vec![0; size as usize];
                file.seek(SeekFrom::Start(offset))?;
                file.read_exact(&mut buf)
                    .with_context(|| format!("reading MP4 sample {i}"))?;
                Ok(buf)
            })
            .collect()
    }
}

fn ascii(kind: &[u8]) -> String {
    String::from_utf8_lossy(kind).into_owned()
}

/// Iterates the child boxes of a box body: (type, body).
fn children(mut data: &[u8]) -> impl Iterator<Item = Result<([u8; 4], &[u8])>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let result = (|| {
            ensure!(data.len() >= 8, "truncated MP4 box header");
            let mut size = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = data[4..8].try_into().unwrap();
            let mut header = 8;
            if size == 1 {
                ensure!(data.len() >= 16, "truncated MP4 box header");
                size = u64::from_be_bytes(data[8..16].try_into().unwrap()) as usize;
                header = 16;
            } else if size == 0 {
                size = data.len();
            }
            ensure!(
                size >= header && size <= data.len(),
                "MP4 box {:?} is truncated",
                ascii(&kind)
            );
            let body = &data[header..size];
            data = &data[size..];
            Ok((kind, body))
        })();
        if result.is_err() {
            data = &[];
        }
        Some(result)
    })
}

fn find<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<Option<&'a [u8]>> {
    for child in children(data) {
        let (k, body) = child?;
        if &k == kind {
            return Ok(Some(body));
        }
    }
    Ok(None)
}

fn need<'a>(data: &'a [u8], kind: &[u8; 4], parent: &str) -> Result<&'a [u8]> {
    find(data, kind)?.with_context(|| format!("MP4 {parent} has no {} box", ascii(kind)))
}

/// Big-endian reader over a box body.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(self.0.len() >= n, "MP4 box body is truncated");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(self.uint(4)? as u32)
    }
}

fn parse_moov(moov: &[u8]) -> Result<Mp4Video> {
    if find(moov, b"mvex")?.is_some() {
        bail!("fragmented MP4 (samples in moof boxes) is not supported; remux it with `-movflags faststart`");
    }
    for child in children(moov) {
        let (kind, trak) = child?;
        if &kind != b"trak" {
            continue;
        }
        let mdia = need(trak, b"mdia", "trak")?;
        let hdlr = need(mdia, b"hdlr", "mdia")?;
        if hdlr.get(8..12) != Some(b"vide") {
            continue;
        }
        return parse_video_track(mdia);
    }
    bail!("MP4 file has no video track")
}

fn parse_video_track(mdia: &[u8]) -> Result<Mp4Video> {
    let mut mdhd = Cursor(need(mdia, b"mdhd", "mdia")?);
    let version = mdhd.uint(1)?;
    mdhd.take(3)?;
    let (timescale, duration) = if version == 1 {
        mdhd.take(16)?;
        (mdhd.u32()?, mdhd.uint(8)?)
    } else {
        mdhd.take(8)?;
        (mdhd.u32()?, mdhd.u32()? as u64)
    };
    ensure!(timescale > 0, "MP4 mdhd timescale is 0");
    let minf = need(mdia, b"minf", "mdia")?;
    let stbl = need(minf, b"stbl", "minf")?;

    let mut stsd = Cursor(need(stbl, b"stsd", "stbl")?);
    stsd.take(8)?;
    let entry = children(stsd.0)
        .next()
        .context("MP4 stsd has no sample entry")??;
    let codec_tag = ascii(&entry.0);
    let mut fields = Cursor(entry.1);
    fields.take(24)?;
    let width = fields.uint(2)? as u32;
    let height = fields.uint(2)? as u32;
    fields.take(50)?;
    let (mut sps, mut pps, mut nal_length_size) = (Vec::new(), Vec::new(), 4);
    if let Some(avcc) = find(fields.0, b"avcC")? {
        let mut c = Cursor(avcc);
        c.take(4)?;
        nal_length_size = (c.uint(1)? & 3) as usize + 1;
        let n_sps = c.uint(1)? & 0x1f;
        for _ in 0..n_sps {
            let len = c.uint(2)? as usize;
            sps.push(c.take(len)?.to_vec());
        }
        let n_pps = c.uint(1)?;
        for _ in 0..n_pps {
            let len = c.uint(2)? as usize;
            pps.push(c.take(len)?.to_vec());
        }
    }

    let mut stts = Cursor(need(stbl, b"stts", "stbl")?);
    stts.take(4)?;
    let mut sample_durations = Vec::new();
    for _ in 0..stts.u32()? {
        let (n, delta) = (stts.u32()?, stts.u32()?);
        ensure!(
            sample_durations.len() + n as usize <= 1 << 26,
            "MP4 stts claims too many samples"
        );
        sample_durations.extend(std::iter::repeat_n(delta, n as usize));
    }

    let mut stsz = Cursor(need(stbl, b"stsz", "stbl")?);
    stsz.take(4)?;
    let fixed = stsz.u32()?;
    let count = stsz.u32()? as usize;
    ensure!(count <= 1 << 26, "MP4 stsz claims too many samples");
    let sample_sizes: Vec<u32> = if fixed != 0 {
        vec![fixed; count]
    } else {
        (0..count).map(|_| stsz.u32()).collect::<Result<_>>()?
    };

    let chunk_offsets: Vec<u64> = if let Some(stco) = find(stbl, b"stco")? {
        let mut c = Cursor(stco);
        c.take(4)?;
        (0..c.u32()?)
            .map(|_| c.u32().map(u64::from))
            .collect::<Result<_>>()?
    } else {
        let mut c = Cursor(need(stbl, b"co64", "stbl")?);
        c.take(4)?;
        (0..c.u32()?).map(|_| c.uint(8)).collect::<Result<_>>()?
    };
    let mut stsc = Cursor(need(stbl, b"stsc", "stbl")?);
    stsc.take(4)?;
    let runs: Vec<(u32, u32)> = (0..stsc.u32()?)
        .map(|_| {
            let first = stsc.u32()?;
            let per_chunk = stsc.u32()?;
            stsc.u32()?;
            Ok((first, per_chunk))
        })
        .collect::<Result<_>>()?;
    let mut sample_offsets = Vec::with_capacity(count);
    for (chunk, &chunk_offset) in chunk_offsets.iter().enumerate() {
        let chunk_no = chunk as u32 + 1;
        let per_chunk = runs
            .iter()
            .rev()
            .find(|r| r.0 <= chunk_no)
            .map_or(0, |r| r.1);
        let mut offset = chunk_offset;
        for _ in 0..per_chunk {
            let Some(&size) = sample_sizes.get(sample_offsets.len()) else {
                break;
            };
            sample_offsets.push(offset);
            offset += size as u64;
        }
    }
    ensure!(
        sample_offsets.len() == count,
        "MP4 sample table is inconsistent: stsz lists {count} samples, the chunks hold {}",
        sample_offsets.len()
    );

    let sync_samples = match find(stbl, b"stss")? {
        Some(stss) => {
            let mut c = Cursor(stss);
            c.take(4)?;
            Some(
                (0..c.u32()?)
                    .map(|_| Ok(c.u32()?.saturating_sub(1) as usize))
                    .collect::<Result<_>>()?,
            )
        }
        None => None,
    };
    Ok(Mp4Video {
        codec_tag,
        width,
        height,
        timescale,
        duration,
        sample_durations,
        sample_sizes,
        sample_offsets,
        sync_samples,
        sps,
        pps,
        nal_length_size,
        fast_start: false,
    })
}
