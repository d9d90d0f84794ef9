//! Shared by the `server_*` integration tests: starts `vidgen serve` on an ephemeral loopback port
//! with its own data directory, and talks HTTP/1.1 to it over a plain socket (so tests can also
//! send what no well-behaved client would: forged lengths, truncated bodies).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: String,
}

impl Server {
    /// Starts a server whose config is `extra` (TOML) plus a loopback bind and the data dir.
    pub fn start(extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Server::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &str) -> Server {
        let config = dir.path().join("vidgen.toml");
        std::fs::write(
            &config,
            format!("bind = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{extra}\n"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vidgen"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("server.log")).unwrap(),
            ))
            .spawn()
            .expect("starting vidgen serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(addr) = line.trim().strip_prefix("listening on http://") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                line.clear();
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("vidgen serve did not start within 60 s; log:\n{log}");
            }
        };
        Server {
            addr,
            child,
            dir,
            config: extra.to_string(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: as abrupt as a crash) and starts it again on the same data.
    pub fn restart(mut self) -> Server {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let extra = self.config.clone();
        drop(self);
        Server::start_in(dir, &extra)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.addr, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn post_multipart(&self, path: &str, parts: &[Part<'_>]) -> Response {
        let (content_type, body) = multipart(parts);
        self.request("POST", path, &[("Content-Type", &content_type)], &body)
    }

    /// Polls the video until `done(status)` or the timeout; returns the last object.
    pub fn wait_for(&self, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.get(&format!("/v1/videos/{id}")).json();
            if done(&v) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "video {id} did not reach the expected state in {timeout:?}; last: {v}\nserver log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        self.wait_for(id, timeout, |v| {
            v["status"] == "completed" || v["status"] == "failed"
        })
    }

    /// Process ids of this server's worker children.
    pub fn worker_pids(&self) -> Vec<u32> {
        let me = self.child.id();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may hold spaces): state, ppid, ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let ppid: u32 = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid == me {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// Asserts an OpenAI-shaped error with this status; returns its message.
    pub fn expect_error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "expected {status}, got {}: {}",
            self.status,
            self.text()
        );
        let v = self.json();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.message: {v}"));
        assert!(v["error"]["type"].is_string(), "no error.type: {v}");
        msg.to_string()
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    send_raw(addr, &raw, Duration::from_secs(30))
}

/// Sends raw bytes and reads the response until its body is complete (Content-Length) or the
/// server closes the connection. Stopping at Content-Length matters: chromedriver keeps the
/// connection open despite `Connection: close`, and reading to the end waited out the timeout.
pub fn send_raw(addr: SocketAddr, raw: &[u8], timeout: Duration) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    // The server may answer (and close) before reading everything: a failed write is fine.
    let _ = stream.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if response_complete(&out) {
            break;
        }
    }
    parse_response(&out)
}

/// Whether `raw` holds a whole response with a Content-Length body.
fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= split + 4 + len)
}

pub fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
        else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

pub enum Part<'a> {
    Text(&'a str, &'a str),
    /// (field, file name, content type, bytes)
    File(&'a str, &'a str, &'a str, &'a [u8]),
}

pub fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = "----vidgen-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(name, file, ctype, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: {ctype}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A small valid PNG (solid colour), made with a minimal encoder (stored deflate blocks).
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..height {
        raw.extend([0u8]); // PNG filter type of the row: none
        for x in 0..width {
            raw.extend_from_slice(&[(x * 7) as u8, 120, 200]);
        }
    }
    png_from_raw(width, height, &raw)
}

/// A PNG whose header claims `width × height` but whose data is tiny: a decompression bomb shape.
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    png_from_raw(width, height, &[0u8; 16])
}

fn png_from_raw(width: u32, height: u32, raw: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_data = kind.to_vec();
        crc_data.extend_from_slice(data);
        out.extend_from_slice(&crc_data);
        out.extend_from_slice(&crc32(&crc_data).to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    // zlib stream of stored blocks.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(block.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// Frame count and frame rate of a video file, read back with ffprobe.
pub fn ffprobe(path: &Path) -> (u32, f64) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames,r_frame_rate",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("running ffprobe (install ffmpeg)");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let frames: u32 = s["nb_read_frames"].as_str().unwrap().parse().unwrap();
    let (n, d) = s["r_frame_rate"].as_str().unwrap().split_once('/').unwrap();
    (
        frames,
        n.parse::<f64>().unwrap() / d.parse::<f64>().unwrap(),
    )
}

/// Every file under `root` (relative paths).
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A job that runs long on the demo model (largest size, most frames and steps).
pub fn long_job() -> Value {
    serde_json::json!({
        "model": "demo",
        "prompt": "a long job",
        "size": "512x512",
        "frames": 81,
        "steps": 100,
        "seed": 1,
    })
}

/// Reads the job's SSE stream until `enough(text)` or the timeout.
pub fn read_events(
    server: &Server,
    id: &str,
    timeout: Duration,
    enough: impl Fn(&str) -> bool,
) -> String {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        stream,
        "GET /v1/videos/{id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let start = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 8192];
    while start.elapsed() < timeout && !enough(&text) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => continue,
        }
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{text}"
    );
    text
}

/// The events of an SSE text (as read by [`read_events`]): (event name, JSON data) in order.
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let mut out = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    // Chunk-size lines of the chunked encoding hold neither prefix and are skipped.
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim());
        } else if line.is_empty() && !event.is_empty() {
            let value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event {event}: data is not JSON ({e}): {data}"));
            out.push((std::mem::take(&mut event), value));
            data.clear();
        }
    }
    out
}
