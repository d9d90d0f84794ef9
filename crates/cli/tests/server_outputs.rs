//! What a finished job offers over real HTTP on the demo model: the thumbnail and spritesheet
//! variants (images made from the video's own frames), `/v1/videos/extensions` (one stitched
//! file continuing the source's last frame), and the metrics and logs a job leaves behind.

mod server_support;

use std::path::Path;

use base64::Engine as _;
use image::imageops::FilterType;
use std::time::Duration;

use serde_json::{json, Value};
use server_support::{ffprobe, long_job, read_events, sse_events, Server};

const TIMEOUT: Duration = Duration::from_secs(300);

fn create(server: &Server, body: &Value) -> Value {
    let resp = server.post_json("/v1/videos", body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// Downloads the video and decodes it (the same decoder the worker uses for its stills).
fn download(server: &Server, id: &str, dir: &Path) -> (std::path::PathBuf, vidgen_media::Frames) {
    let resp = server.get(&format!("/v1/videos/{id}/content"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("video/mp4"));
    let path = dir.join(format!("{id}.mp4"));
    std::fs::write(&path, &resp.body).unwrap();
    let (_, frames) = vidgen_media::decode(&path).unwrap();
    (path, frames)
}

fn rgb(frames: &vidgen_media::Frames, index: usize) -> image::RgbImage {
    image::RgbImage::from_raw(
        frames.width() as u32,
        frames.height() as u32,
        frames.frame(index).to_vec(),
    )
    .unwrap()
}

/// Mean absolute difference per channel value, 0..=255.
fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

fn std_dev(img: &image::RgbImage) -> f64 {
    let v = img.as_raw();
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    (v.iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / v.len() as f64)
        .sqrt()
}

#[test]
fn thumbnail_and_spritesheet_are_images_of_the_video() {
    let server = Server::start("");
    // Not square, so a swapped width/height would show.
    let v = create(
        &server,
        &json!({"prompt": "a lighthouse at dusk", "size": "320x192", "frames": 9, "steps": 2,
                "seed": 11}),
    );
    let id = id_of(&v);
    // Before completion there is nothing to serve: 409 not_ready (or completed already).
    let early = server.get(&format!("/v1/videos/{id}/content?variant=thumbnail"));
    if early.status != 200 {
        early.expect_error(409);
        assert_eq!(early.json()["error"]["code"], "not_ready");
    }
    // Queued behind it, so its event stream is followed from the start.
    let follower = id_of(&create(
        &server,
        &json!({"prompt": "followed", "frames": 5, "steps": 3, "seed": 2}),
    ));
    let text = read_events(&server, &follower, TIMEOUT, |t| t.contains("event: done"));
    check_event_stream(&sse_events(&text), 3);

    let done = server.wait_finished(&id, TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}\n{}", server.log());

    let tmp = tempfile::tempdir().unwrap();
    let (_, frames) = download(&server, &id, tmp.path());
    assert_eq!(
        (frames.width(), frames.height(), frames.len()),
        (320, 192, 9)
    );

    // Thumbnail: a lossless WebP of the first frame, full size.
    let thumb = server.get(&format!("/v1/videos/{id}/content?variant=thumbnail"));
    assert_eq!(thumb.status, 200, "{}", thumb.text());
    assert_eq!(thumb.header("content-type"), Some("image/webp"));
    assert!(thumb
        .header("content-disposition")
        .is_some_and(|d| d.contains(&format!("{id}.webp"))));
    assert_eq!(&thumb.body[..4], b"RIFF");
    assert_eq!(&thumb.body[8..12], b"WEBP");
    let img = image::load_from_memory_with_format(&thumb.body, image::ImageFormat::WebP)
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (320, 192));
    assert!(std_dev(&img) > 2.0, "a picture, not a flat fill");
    assert_eq!(
        mean_abs_diff(&img, &rgb(&frames, 0)),
        0.0,
        "the thumbnail is the video's first frame, losslessly"
    );

    // Spritesheet: a JPEG grid of all 9 frames (at most 16 tiles), 4 per row, 256 px wide
    // tiles keeping the aspect ratio (256 × 192/320 = 153.6 -> 154), row-major.
    let sheet = server.get(&format!("/v1/videos/{id}/content?variant=spritesheet"));
    assert_eq!(sheet.status, 200, "{}", sheet.text());
    assert_eq!(sheet.header("content-type"), Some("image/jpeg"));
    assert_eq!(&sheet.body[..3], &[0xFF, 0xD8, 0xFF]);
    let grid = image::load_from_memory_with_format(&sheet.body, image::ImageFormat::Jpeg)
        .unwrap()
        .to_rgb8();
    let (tw, th, columns, rows) = (256u32, 154u32, 4u32, 3u32);
    assert_eq!(grid.dimensions(), (tw * columns, th * rows));
    let small: Vec<image::RgbImage> = (0..frames.len())
        .map(|i| image::imageops::resize(&rgb(&frames, i), tw, th, FilterType::Triangle))
        .collect();
    for tile in 0..9u32 {
        let (x, y) = ((tile % columns) * tw, (tile / columns) * th);
        let cell = image::imageops::crop_imm(&grid, x, y, tw, th).to_image();
        let diffs: Vec<f64> = small.iter().map(|f| mean_abs_diff(&cell, f)).collect();
        let own = diffs[tile as usize];
        // JPEG at quality 85 of noisy demo frames: a few levels off its own frame, and far
        // from every other frame (they differ by ~50 levels).
        assert!(own < 10.0, "tile {tile} differs from frame {tile} by {own}");
        let nearest_other = diffs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != tile as usize)
            .map(|(_, d)| *d)
            .fold(f64::INFINITY, f64::min);
        assert!(
            own * 3.0 < nearest_other,
            "tile {tile} is not clearly frame {tile}: {diffs:?}"
        );
    }
    // The cells after the last tile are empty (black).
    let empty = image::imageops::crop_imm(&grid, tw, 2 * th, 3 * tw, th).to_image();
    let black = image::RgbImage::new(3 * tw, th);
    assert!(mean_abs_diff(&empty, &black) < 3.0);

    // Files stay inside the job folder under server-made names.
    let job_dir = server.data_dir().join("jobs").join(&id);
    for name in ["video.mp4", "thumbnail.webp", "spritesheet.jpg"] {
        assert!(job_dir.join(name).is_file(), "{name} missing");
    }
}

#[test]
fn extensions_continue_the_last_frame_in_one_file() {
    // A text-to-video model beside the demo (random weights: its jobs must never run here).
    let server = Server::start(
        "[[models]]\nname = \"demo\"\npath = \"demo\"\n\
         [[models]]\nname = \"t2v\"\npath = \"random:wan2.1-t2v-1.3b\"",
    );
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["extensions"], true);
    assert_eq!(models["data"][1]["extensions"], false);

    let source = create(
        &server,
        &json!({"model": "demo", "prompt": "a paper boat on a pond", "size": "256x256",
                "frames": 5, "steps": 2, "seed": 5}),
    );
    let source_id = id_of(&source);
    let done = server.wait_finished(&source_id, TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}");

    // Extend by 0.3 s: 4.8 frames at 16 fps -> 5 (the nearest 4k+1 count).
    let ext = server.post_json(
        "/v1/videos/extensions",
        &json!({"prompt": "the boat drifts away", "seconds": "0.3",
                "video": {"id": source_id}}),
    );
    assert_eq!(ext.status, 200, "{}", ext.text());
    let ext = ext.json();
    assert_eq!(ext["extended_from_video_id"], source_id.as_str());
    assert_eq!(ext["size"], "256x256", "the source's size");
    assert_eq!(ext["has_image"], true);
    assert_eq!(ext["frames"], 5, "the new segment: {ext}");
    let ext_id = id_of(&ext);
    let ext_done = server.wait_finished(&ext_id, TIMEOUT);
    assert_eq!(
        ext_done["status"],
        "completed",
        "{ext_done}\n{}",
        server.log()
    );

    // One stitched file: the source's 5 frames, then the segment's 5 minus its first, which
    // re-creates the conditioning frame (the source's last) and is dropped.
    let tmp = tempfile::tempdir().unwrap();
    let (src_path, src_frames) = download(&server, &source_id, tmp.path());
    let (ext_path, ext_frames) = download(&server, &ext_id, tmp.path());
    assert_eq!(ffprobe(&src_path).0, 5);
    let (count, fps) = ffprobe(&ext_path);
    assert_eq!(count, 5 + 5 - 1);
    assert!((fps - 16.0).abs() < 1e-6, "{fps}");
    assert_eq!(ext_done["frames"], 9, "{ext_done}");
    assert_eq!(ext_done["seconds"], "0.562");
    assert_eq!(ext_frames.len(), 9);
    // The source plays first (re-encoded: close, not bit-equal).
    for i in 0..5 {
        let d = mean_abs_diff(&rgb(&ext_frames, i), &rgb(&src_frames, i));
        assert!(
            d < 4.0,
            "frame {i} of the extension differs from the source by {d}"
        );
    }
    // The new segment was conditioned on exactly the source's last frame.
    let cond = image::open(
        server
            .data_dir()
            .join("jobs")
            .join(&ext_id)
            .join("input.png"),
    )
    .unwrap()
    .to_rgb8();
    assert_eq!(mean_abs_diff(&cond, &rgb(&src_frames, 4)), 0.0);
    assert!(
        !server
            .data_dir()
            .join("jobs")
            .join(&ext_id)
            .join("segment.mp4")
            .exists(),
        "the intermediate segment is removed"
    );
    // Its stills come from the stitched video.
    let thumb = server.get(&format!("/v1/videos/{ext_id}/content?variant=thumbnail"));
    assert_eq!(thumb.status, 200);

    // Refusals: unknown source, missing id, an unfinished source, a text-to-video model.
    let msg = server
        .post_json("/v1/videos/extensions", &json!({"prompt": "p"}))
        .expect_error(400);
    assert!(msg.contains("video"), "{msg}");
    server
        .post_json(
            "/v1/videos/extensions",
            &json!({"prompt": "p", "video": {"id": "video_00000000000000000000000000000000"}}),
        )
        .expect_error(404);
    let running = id_of(&create(&server, &long_job()));
    server.wait_for(&running, TIMEOUT, |v| v["status"] == "in_progress");
    // Queued behind the long job; deleted before it could start.
    let t2v = id_of(&create(
        &server,
        &json!({"model": "t2v", "prompt": "never runs", "frames": 5, "steps": 1}),
    ));
    let resp = server.post_json(
        "/v1/videos/extensions",
        &json!({"prompt": "p", "video": {"id": t2v}}),
    );
    let msg = resp.expect_error(400);
    assert!(msg.contains("text-to-video"), "{msg}");
    assert_eq!(resp.json()["error"]["code"], "unsupported_model");
    let del = server.request("DELETE", &format!("/v1/videos/{t2v}"), &[], b"");
    assert_eq!(del.status, 200, "{}", del.text());
    let msg = server
        .post_json(
            "/v1/videos/extensions",
            &json!({"prompt": "p", "video": {"id": running}}),
        )
        .expect_error(400);
    assert!(
        msg.contains("in_progress") && msg.contains("completed"),
        "{msg}"
    );
    let c = server.request("POST", &format!("/v1/videos/{running}/cancel"), &[], b"");
    assert_eq!(c.status, 200, "{}", c.text());
    let v = server.wait_finished(&running, Duration::from_secs(60));
    assert_eq!(v["error"]["code"], "cancelled", "{v}");

    // Metrics: queue depth, job and per-stage durations, failures by cause, GPU memory (listed
    // per GPU where nvidia-smi answers, otherwise a comment saying there is none).
    let metrics = server.get("/metrics").text();
    for line in [
        "vidgen_queue_depth 0",
        "vidgen_jobs_completed_total 2",
        "vidgen_job_duration_seconds_count 2",
        "vidgen_job_failures_total{cause=\"cancelled\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    for stage in [
        "text_encode",
        "image_encode",
        "denoise",
        "vae_decode",
        "encode",
    ] {
        let sum = metric(
            &metrics,
            &format!("vidgen_stage_duration_seconds_sum{{stage=\"{stage}\"}}"),
        );
        assert!(sum > 0.0, "{stage}: {sum}\n{metrics}");
    }
    assert!(
        metrics.contains("vidgen_gpu_memory_used_bytes{gpu=\"")
            || metrics.contains("# vidgen_gpu_memory_*: no NVIDIA GPU visible"),
        "{metrics}"
    );

    // Structured logs carry the job id through its life.
    let log = server.log();
    for event in ["job queued", "job started", "job completed"] {
        assert!(
            log.lines()
                .any(|l| l.contains(event) && l.contains(&format!("job_id={ext_id}"))),
            "no `{event}` line with job_id={ext_id}:\n{log}"
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

/// The whole life of a job on `/events`: the object while queued, each stage in order, every
/// denoising step with its total and ETA, progress that never goes back, the completed object,
/// then `done`. (`preview` events are forwarded when the pipeline sends them; the engine does not
/// emit any yet.)
fn check_event_stream(events: &[(String, Value)], steps: u64) {
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"video"), "{names:?}");
    assert_eq!(events[0].1["status"], "queued");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let stages: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "stage")
        .map(|(_, d)| d["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["text_encode", "denoise", "vae_decode", "encode"],
        "{names:?}"
    );
    let step_events: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "step")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        step_events
            .iter()
            .map(|d| d["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    for d in &step_events {
        assert_eq!(d["stage"], "denoise");
        assert_eq!(d["total"].as_u64(), Some(steps), "{d}");
        let eta = d["eta_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("no eta_s: {d}"));
        assert!(eta >= 0.0, "{d}");
    }
    assert_eq!(step_events.last().unwrap()["eta_s"], 0.0);
    // Under 8 steps a preview follows every step: the estimate of the clean middle frame at latent
    // resolution (the demo's 256x256 has 32x32 latents), a PNG that decodes to its stated size.
    let previews: Vec<(usize, &Value)> = events
        .iter()
        .enumerate()
        .filter(|(_, (e, _))| e == "preview")
        .map(|(i, (_, d))| (i, d))
        .collect();
    assert_eq!(
        previews
            .iter()
            .map(|(_, d)| d["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "{names:?}"
    );
    for (i, d) in &previews {
        assert_eq!(
            events[i - 1].0,
            "step",
            "a preview follows its step: {names:?}"
        );
        assert_eq!(events[i - 1].1["step"], d["step"]);
        assert_eq!(
            (d["width"].as_u64(), d["height"].as_u64()),
            (Some(32), Some(32))
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(d["png_base64"].as_str().unwrap())
            .unwrap();
        let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (32, 32));
        assert!(std_dev(&img) > 1.0, "a preview is not a flat colour");
    }
    let progress: Vec<u64> = events
        .iter()
        .filter_map(|(_, d)| d["progress"].as_u64())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    let statuses: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "video")
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "in_progress", "completed"]);
}
