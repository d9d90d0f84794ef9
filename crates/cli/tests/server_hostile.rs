//! Hostile input over real HTTP: each is a clear 4xx in OpenAI's error shape, the server keeps
//! running, and no file appears outside the data directory (nor a stray one inside it).

mod server_support;

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use server_support::{files_under, multipart, png, png_bomb, send_raw, Part, Server};

const CONFIG: &str =
    "[limits]\nmax_body_bytes = 1048576\nmax_upload_bytes = 200000\nmax_image_pixels = 1000000";

#[test]
fn hostile_requests_get_clear_4xx_and_leave_no_trace() {
    let server = Server::start(CONFIG);
    let json_ct = [("Content-Type", "application/json")];
    let post = |body: &[u8]| server.request("POST", "/v1/videos", &json_ct, body);

    // Malformed and mistyped JSON.
    assert!(post(b"{\"prompt\": \"unterminated")
        .expect_error(400)
        .contains("invalid JSON"));
    assert!(post(b"").expect_error(400).contains("invalid JSON"));
    assert!(post(b"[1, 2]").expect_error(400).contains("object"));
    let r = post(br#"{"prompt": "p", "frame_count": 81}"#);
    assert!(r.expect_error(400).contains("frame_count: unknown field"));
    assert_eq!(r.json()["error"]["param"], "frame_count");
    assert_eq!(r.json()["error"]["code"], "unknown_parameter");
    // Near misses of the memory knobs are unknown fields, not silently ignored.
    for field in ["weight", "vae_bf16", "vae-dtype", "fp8"] {
        let r = post(format!(r#"{{"prompt": "p", "{field}": "fp8"}}"#).as_bytes());
        let msg = r.expect_error(400);
        assert!(msg.starts_with(&format!("{field}: unknown field")), "{msg}");
        assert_eq!(r.json()["error"]["code"], "unknown_parameter");
    }
    assert!(post(br#"{"prompt": "p", "input_reference": {"url": "x"}}"#)
        .expect_error(400)
        .contains("input_reference.url"));

    // Out-of-range and wrong-typed numbers: the message names the field.
    for (body, field) in [
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "p", "steps": "abc"}), "steps"),
        (json!({"prompt": "p", "steps": -1}), "steps"),
        (json!({"prompt": "p", "steps": 100000}), "steps"),
        (
            json!({"prompt": "p", "width": 1e20, "height": 256}),
            "width",
        ),
        (
            json!({"prompt": "p", "seed": 18446744073709551615u64}),
            "seed",
        ),
        (json!({"prompt": "p", "seconds": "NaN"}), "seconds"),
        (json!({"prompt": "p", "seconds": -3}), "seconds"),
        (json!({"prompt": "p", "frames": 4_000_000_000u64}), "frames"),
        (json!({"prompt": "p", "guidance": 1000}), "guidance"),
        (json!({"prompt": "p", "shift": 0}), "shift"),
        (json!({"prompt": "p", "fps": 0}), "fps"),
        (json!({"prompt": "p", "scheduler": "ddim"}), "scheduler"),
        (json!({"prompt": "p", "offload": "gpu"}), "offload"),
        (json!({"prompt": "p", "weights": "fp16"}), "weights"),
        (json!({"prompt": "p", "weights": "FP8"}), "weights"),
        (json!({"prompt": "p", "weights": 8}), "weights"),
        (json!({"prompt": "p", "vae_dtype": "f16"}), "vae_dtype"),
        (json!({"prompt": "p", "vae_dtype": ["bf16"]}), "vae_dtype"),
        (json!({"prompt": "p", "vae_dtype": ""}), "vae_dtype"),
        (
            json!({"prompt": "p", "output_format": "gif"}),
            "output_format",
        ),
        (
            json!({"prompt": "p", "align_frames": "maybe"}),
            "align_frames",
        ),
        (json!({"prompt": "x".repeat(5000)}), "prompt"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({}), "prompt"),
    ] {
        let msg = post(body.to_string().as_bytes()).expect_error(400);
        assert!(msg.starts_with(field), "{body}: {msg}");
    }

    // Content types that are neither multipart nor JSON.
    server
        .request(
            "POST",
            "/v1/videos",
            &[("Content-Type", "text/plain")],
            b"prompt=p",
        )
        .expect_error(415);

    // A Content-Length shorter than the body: only the declared bytes are the body.
    let body = br#"{"prompt": "a perfectly fine prompt", "frames": 5}"#;
    let r = server.request(
        "POST",
        "/v1/videos",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
        ],
        body,
    );
    assert!(r.expect_error(400).contains("invalid JSON"));
    // A Content-Length longer than what is sent, then the client gives up: no response or a 4xx.
    let raw = "POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\nConnection: close\r\n\r\n{\"prompt\": \"p\""
        .to_string();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut out);
    if !out.is_empty() {
        let r = server_support::parse_response(&out);
        assert!((400..500).contains(&r.status), "{}", r.text());
    }

    // Oversized bodies: declared (refused before reading) and streamed without a length.
    let big = vec![b' '; 2 << 20];
    post(&big).expect_error(413);
    let mut raw = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for _ in 0..40 {
        raw.extend_from_slice(format!("{:x}\r\n", 64 << 10).as_bytes());
        raw.extend_from_slice(&vec![b' '; 64 << 10]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    send_raw(server.addr, &raw, Duration::from_secs(30)).expect_error(413);

    // Uploads: too large, not an image, a decompression bomb, a truncated image, two files.
    let mp = |parts: &[Part<'_>]| server.post_multipart("/v1/videos", parts);
    let huge = vec![0u8; 300_000];
    let msg = mp(&[
        Part::Text("prompt", "p"),
        Part::File("input_reference", "a.png", "image/png", &huge),
    ])
    .expect_error(413);
    assert!(msg.contains("max_upload_bytes"), "{msg}");
    let msg = mp(&[
        Part::Text("prompt", "p"),
        Part::File(
            "input_reference",
            "a.png",
            "image/png",
            b"#!/bin/sh\nrm -rf /\n",
        ),
    ])
    .expect_error(400);
    assert!(
        msg.starts_with("input_reference") && msg.contains("JPEG, PNG, WebP"),
        "{msg}"
    );
    let bomb = png_bomb(60_000, 60_000);
    assert!(bomb.len() < 200, "the bomb is tiny on the wire");
    let msg = mp(&[
        Part::Text("prompt", "p"),
        Part::File("input_reference", "bomb.png", "image/png", &bomb),
    ])
    .expect_error(400);
    assert!(msg.contains("megapixels"), "{msg}");
    let mut truncated = png(64, 64);
    truncated.truncate(truncated.len() / 2);
    mp(&[
        Part::Text("prompt", "p"),
        Part::File("input_reference", "t.png", "image/png", &truncated),
    ])
    .expect_error(400);
    let small = png(8, 8);
    let msg = mp(&[
        Part::Text("prompt", "p"),
        Part::File("input_reference", "a.png", "image/png", &small),
        Part::File("input_reference", "b.png", "image/png", &small),
    ])
    .expect_error(400);
    assert!(msg.contains("one file"), "{msg}");
    // Duplicate, unknown and oversized text fields; a remote image URL.
    assert!(mp(&[Part::Text("prompt", "a"), Part::Text("prompt", "b")])
        .expect_error(400)
        .contains("more than once"));
    assert!(
        mp(&[Part::Text("prompt", "a"), Part::Text("character_ids", "c1")])
            .expect_error(400)
            .contains("unknown field")
    );
    let long = "y".repeat(100_000);
    mp(&[Part::Text("prompt", &long)]).expect_error(400);
    let msg = mp(&[
        Part::Text("prompt", "p"),
        Part::Text(
            "input_reference[image_url]",
            "http://169.254.169.254/latest",
        ),
    ])
    .expect_error(400);
    assert!(msg.contains("data URL"), "{msg}");
    let (ct, mut body) = multipart(&[Part::Text("prompt", "p")]);
    body.truncate(body.len() - 10);
    server
        .request("POST", "/v1/videos", &[("Content-Type", &ct)], &body)
        .expect_error(400);

    // Traversal-shaped ids and names.
    for path in [
        "/v1/videos/..%2F..%2Fetc%2Fpasswd",
        "/v1/videos/video_..%2F..%2Fvidgen.sqlite/content",
        "/v1/videos/%2e%2e/content",
        "/v1/videos/video_0123456789abcdef0123456789abcdef",
        "/v1/videos/video_0123456789ABCDEF0123456789ABCDEF/content",
    ] {
        server.get(path).expect_error(404);
        // `/content` only answers GET: a DELETE there is 405 (no effect), elsewhere an unknown id is 404.
        let delete_status = if path.ends_with("/content") { 405 } else { 404 };
        server
            .request("DELETE", path, &[], b"")
            .expect_error(delete_status);
    }
    let r = send_raw(
        server.addr,
        b"GET /v1/videos/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!((400..500).contains(&r.status), "{}", r.status);
    // A file name with traversal is ignored: the upload is stored as input.png in the job folder.
    let ok = mp(&[
        Part::Text("prompt", "p"),
        Part::Text("frames", "5"),
        Part::Text("steps", "1"),
        Part::File(
            "input_reference",
            "../../../../escaped.png",
            "image/png",
            &small,
        ),
    ]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let id = ok.json()["id"].as_str().unwrap().to_string();

    // Still serving; exactly the expected files exist.
    assert!(server.get("/healthz").status == 200);
    let _ = server.wait_finished(&id, Duration::from_secs(300));
    let root: Vec<String> = files_under(server.dir.path())
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.starts_with("data/"))
        .collect();
    assert_eq!(
        root,
        ["server.log", "vidgen.toml"],
        "files outside the data dir"
    );
    for file in files_under(&server.data_dir()) {
        let f = file.to_string_lossy();
        let expected = f.starts_with("vidgen.sqlite") || f.starts_with(&format!("jobs/{id}/"));
        assert!(expected, "unexpected file in the data dir: {f}");
    }
    let listed = server.get("/v1/videos").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
}
