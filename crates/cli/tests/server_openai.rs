//! The OpenAI Videos API over real HTTP against `vidgen serve` on the demo model: create (multipart,
//! as the official SDK sends it, and JSON) → poll → content read back with ffprobe, uploads, list
//! and pagination, remix, delete; models, metrics, OpenAPI and auth; the memory and precision
//! knobs (`offload`, `weights`, `vae_dtype`) from request to worker, through remix, extension and a
//! restart.

mod server_support;

use std::time::Duration;

use serde_json::{json, Value};
use server_support::{ffprobe, files_under, png, Part, Server};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn create_multipart(server: &Server, parts: &[Part<'_>]) -> Value {
    let resp = server.post_multipart("/v1/videos", parts);
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

#[test]
fn openai_flow_on_the_demo_model() {
    let server = Server::start("");

    // 1. Create as the Python SDK does: multipart even without a file; `seconds` as a string.
    let v = create_multipart(
        &server,
        &[
            Part::Text("model", "demo"),
            Part::Text("prompt", "a red fox running through snow"),
            Part::Text("seconds", "1"),
            Part::Text("size", "256x256"),
        ],
    );
    assert_eq!(v["object"], "video");
    assert!(v["id"].as_str().unwrap().starts_with("video_"), "{v}");
    assert!(
        v["status"] == "queued" || v["status"] == "in_progress",
        "{v}"
    );
    assert_eq!(v["model"], "demo");
    assert_eq!(v["size"], "256x256");
    // 1 s at 16 fps -> 17 frames (the 4k+1 count nearest to 16), reported as what will be made.
    assert_eq!(v["frames"], 17, "{v}");
    assert_eq!(v["fps"], 16);
    assert_eq!(v["seconds"], "1.062");
    assert!(v["created_at"].as_i64().unwrap() > 1_600_000_000);
    let id = v["id"].as_str().unwrap().to_string();

    // 2. Poll: while not finished, retrieve carries openai-poll-after-ms for create_and_poll.
    let first = server.get(&format!("/v1/videos/{id}"));
    assert_eq!(first.status, 200);
    if matches!(
        first.json()["status"].as_str(),
        Some("queued" | "in_progress")
    ) {
        let ms: u64 = first
            .header("openai-poll-after-ms")
            .expect("poll header")
            .parse()
            .unwrap();
        assert!((100..=10_000).contains(&ms), "{ms}");
    }
    let done = server.wait_finished(&id, JOB_TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}\n{}", server.log());
    assert_eq!(done["progress"], 100);
    assert!(done["error"].is_null());
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert!(done["expires_at"].as_i64().unwrap() > done["completed_at"].as_i64().unwrap());

    // 3. Content: an MP4 whose frames and fps are what the object reports.
    let content = server.get(&format!("/v1/videos/{id}/content"));
    assert_eq!(content.status, 200, "{}", content.text());
    assert_eq!(content.header("content-type"), Some("video/mp4"));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("out.mp4");
    std::fs::write(&file, &content.body).unwrap();
    let (frames, fps) = ffprobe(&file);
    assert_eq!(frames, done["frames"].as_u64().unwrap() as u32, "{done}");
    assert!(
        (fps - done["fps"].as_f64().unwrap()).abs() < 1e-6,
        "{fps} vs {done}"
    );
    let expected_seconds = f64::from(frames) / fps;
    let reported: f64 = done["seconds"].as_str().unwrap().parse().unwrap();
    assert!(
        (reported - expected_seconds).abs() < 1e-3,
        "{reported} vs {expected_seconds}"
    );
    // Range requests work (the portal's player seeks).
    let part = server.request(
        "GET",
        &format!("/v1/videos/{id}/content"),
        &[("Range", "bytes=0-99")],
        b"",
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body.len(), 100);
    assert_eq!(&part.body[..], &content.body[..100]);
    // Unknown variants are refused by name.
    let msg = server
        .get(&format!("/v1/videos/{id}/content?variant=poster"))
        .expect_error(400);
    assert!(msg.contains("video, thumbnail, spritesheet"), "{msg}");

    // 4. JSON create with the native knobs, and a data-URL image (TI2V takes an image).
    let data_url = format!("data:image/png;base64,{}", base64_encode(&png(48, 32)));
    let resp = server.post_json(
        "/v1/videos",
        &json!({
            "model": "demo", "prompt": "from json", "frames": 5, "steps": 2, "seed": 42,
            "guidance": 3.5, "shift": 3.0, "scheduler": "euler", "negative_prompt": "blurry",
            "offload": "aggressive", "weights": "fp8", "vae_dtype": "f32",
            "input_reference": {"image_url": data_url},
        }),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let j = resp.json();
    assert_eq!(
        (
            j["frames"].as_u64(),
            j["steps"].as_u64(),
            j["seed"].as_u64()
        ),
        (Some(5), Some(2), Some(42))
    );
    assert_eq!(j["scheduler"], "euler");
    assert_eq!(j["offload"], "aggressive");
    assert_eq!(
        (&j["weights"], &j["vae_dtype"]),
        (&json!("fp8"), &json!("f32"))
    );
    assert_eq!(j["has_image"], true);
    let json_id = j["id"].as_str().unwrap().to_string();
    let stored = server
        .data_dir()
        .join("jobs")
        .join(&json_id)
        .join("input.png");
    assert!(
        stored.exists(),
        "sanitised upload stored under a server-made name"
    );

    // 5. Multipart upload of an image file with a hostile file name: stored as input.png only.
    let img = png(40, 24);
    let m = create_multipart(
        &server,
        &[
            Part::Text("prompt", "from an upload"),
            Part::Text("frames", "5"),
            Part::Text("steps", "2"),
            Part::File("input_reference", "../../evil.png", "image/png", &img),
        ],
    );
    assert_eq!(m["has_image"], true);
    let up_id = m["id"].as_str().unwrap().to_string();
    let job_files = files_under(&server.data_dir().join("jobs").join(&up_id));
    assert!(
        job_files.iter().any(|p| p.to_str() == Some("input.png")),
        "{job_files:?}"
    );
    assert!(!server.dir.path().join("evil.png").exists());

    // 6. Remix: the source's settings (seed included) with a new prompt.
    let r = server.post_json(
        &format!("/v1/videos/{id}/remix"),
        &json!({"prompt": "a blue fox"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["remixed_from_video_id"], id.as_str());
    assert_eq!(r["prompt"], "a blue fox");
    // The source asked for no memory knobs: the remix reports the defaults too.
    assert_eq!(
        (&r["offload"], &r["weights"], &r["vae_dtype"]),
        (&json!("auto"), &json!("bf16"), &json!("auto"))
    );
    assert_eq!(
        (r["seed"].clone(), r["frames"].clone(), r["size"].clone()),
        (
            done["seed"].clone(),
            done["frames"].clone(),
            done["size"].clone()
        )
    );
    let remix_id = r["id"].as_str().unwrap().to_string();

    for other in [&json_id, &up_id, &remix_id] {
        let v = server.wait_finished(other, JOB_TIMEOUT);
        assert_eq!(v["status"], "completed", "{v}");
    }

    // 7. List and paginate (oldest first): every job exactly once, in creation order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let q = match &after {
            Some(a) => format!("/v1/videos?limit=1&order=asc&after={a}"),
            None => "/v1/videos?limit=1&order=asc".to_string(),
        };
        let page = server.get(&q).json();
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{page}");
        seen.push(data[0]["id"].as_str().unwrap().to_string());
        assert_eq!(page["first_id"], page["last_id"]);
        if page["has_more"] == false {
            break;
        }
        after = Some(seen.last().unwrap().clone());
    }
    assert_eq!(
        seen,
        vec![id.clone(), json_id.clone(), up_id.clone(), remix_id.clone()]
    );
    let desc = server.get("/v1/videos").json();
    let ids: Vec<&str> = desc["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&remix_id, &up_id, &json_id, &id].map(String::as_str));
    assert_eq!(desc["has_more"], false);
    server.get("/v1/videos?limit=0").expect_error(400);
    server.get("/v1/videos?order=sideways").expect_error(400);
    server
        .get("/v1/videos?after=video_00000000000000000000000000000000")
        .expect_error(400);
    server.get("/v1/videos?colour=red").expect_error(400);

    // 8. Delete: the object, then 404, and its files are gone.
    let del = server.request("DELETE", &format!("/v1/videos/{json_id}"), &[], b"");
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(
        del.json(),
        json!({"id": json_id, "object": "video.deleted", "deleted": true})
    );
    server
        .get(&format!("/v1/videos/{json_id}"))
        .expect_error(404);
    server
        .request("DELETE", &format!("/v1/videos/{json_id}"), &[], b"")
        .expect_error(404);
    assert!(!server.data_dir().join("jobs").join(&json_id).exists());

    // 9. Cancel of a finished job is a conflict, not a silent success.
    server
        .request("POST", &format!("/v1/videos/{id}/cancel"), &[], b"")
        .expect_error(409);

    // 10. Metrics saw it all.
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("vidgen_jobs_completed_total 4"),
        "{metrics}"
    );
    assert!(metrics.contains("vidgen_queue_depth 0"), "{metrics}");
    assert!(
        metrics.contains("vidgen_stage_duration_seconds_count{stage=\"denoise\"}"),
        "{metrics}"
    );
}

#[test]
fn validation_happens_before_queueing_with_the_models_rules() {
    let server = Server::start("");
    // Sizes: the model's message lists what it can make.
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "size": "250x250"}))
        .expect_error(400);
    assert!(msg.contains("size") && msg.contains("256x256"), "{msg}");
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "size": "big"}))
        .expect_error(400);
    assert!(msg.contains("WIDTHxHEIGHT"), "{msg}");
    // Frames: the 4k+1 rule with the nearest valid counts.
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "frames": 16}))
        .expect_error(400);
    assert!(msg.contains("frames") && msg.contains("13 or 17"), "{msg}");
    // Too long for the model.
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "seconds": "60"}))
        .expect_error(400);
    assert!(msg.contains("seconds"), "{msg}");
    // A parameter that would be ignored fails instead (single-expert model).
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "guidance_2": 3.0}))
        .expect_error(400);
    assert!(msg.contains("guidance_2"), "{msg}");
    let msg = server
        .post_json("/v1/videos", &json!({"prompt": "p", "model": "sora-2"}))
        .expect_error(400);
    assert!(msg.contains("demo"), "{msg}");
    let e = server.post_json("/v1/videos", &json!({"prompt": "p", "steps": 0}));
    assert_eq!(e.json()["error"]["param"], "steps");
    // Memory and precision knobs: the field and its valid values.
    let e = server.post_json("/v1/videos", &json!({"prompt": "p", "weights": "fp16"}));
    assert_eq!(
        e.expect_error(400),
        "weights: `fp16` is not one of bf16, fp8, fp8-matmul"
    );
    assert_eq!(e.json()["error"]["param"], "weights");
    let e = server.post_multipart(
        "/v1/videos",
        &[Part::Text("prompt", "p"), Part::Text("vae_dtype", "f16")],
    );
    assert_eq!(
        e.expect_error(400),
        "vae_dtype: `f16` is not one of auto, bf16, f32"
    );
    assert_eq!(e.json()["error"]["param"], "vae_dtype");
    if !cfg!(feature = "cuda") {
        // A CPU-only build's workers run on the CPU: a bf16 VAE is refused here, not in a worker.
        let msg = server
            .post_json("/v1/videos", &json!({"prompt": "p", "vae_dtype": "bf16"}))
            .expect_error(400);
        assert!(
            msg.starts_with("vae_dtype: bf16") && msg.contains("built without CUDA"),
            "{msg}"
        );
    }
    // Nothing was queued by any of these.
    assert_eq!(server.get("/v1/videos").json()["data"], json!([]));
}

#[test]
fn vae_dtype_bf16_follows_the_workers_device() {
    // Workers on the CPU (queue.device): refused at the boundary, in OpenAI's error shape, and
    // not offered by /v1/models.
    let cpu = Server::start("[queue]\ndevice = \"cpu\"");
    let e = cpu.post_json(
        "/v1/videos",
        &json!({"prompt": "p", "frames": 5, "vae_dtype": "bf16"}),
    );
    let msg = e.expect_error(400);
    assert!(
        msg.starts_with("vae_dtype: bf16 runs on a GPU only") && msg.contains("queue.device = cpu"),
        "{msg}"
    );
    assert_eq!(e.json()["error"]["param"], "vae_dtype");
    assert_eq!(e.json()["error"]["type"], "invalid_request_error");
    let models = cpu.get("/v1/models").json();
    assert_eq!(
        models["data"][0]["vae_dtype"],
        json!({"default": "auto", "values": ["auto", "f32"]})
    );
    assert_eq!(
        cpu.get("/v1/videos").json()["data"],
        json!([]),
        "nothing queued"
    );
    drop(cpu);

    // Workers on a GPU: accepted, reported and offered (whether this build can run it is the
    // worker's business: the job is deleted before it matters).
    let gpu = Server::start("[queue]\ndevice = \"cuda\"");
    let models = gpu.get("/v1/models").json();
    assert_eq!(
        models["data"][0]["vae_dtype"]["values"],
        json!(["auto", "bf16", "f32"])
    );
    let v = gpu.post_json(
        "/v1/videos",
        &json!({"prompt": "p", "frames": 5, "steps": 1, "vae_dtype": "bf16"}),
    );
    assert_eq!(v.status, 200, "{}", v.text());
    let v = v.json();
    assert_eq!(v["vae_dtype"], "bf16");
    let id = v["id"].as_str().unwrap();
    let del = gpu.request("DELETE", &format!("/v1/videos/{id}"), &[], b"");
    assert_eq!(del.status, 200, "{}", del.text());
}

#[test]
fn memory_knobs_reach_the_worker_and_survive_remix_extension_and_restart() {
    let server = Server::start("");
    let knobs = |v: &Value| {
        (
            v["offload"].as_str().unwrap().to_string(),
            v["weights"].as_str().unwrap().to_string(),
            v["vae_dtype"].as_str().unwrap().to_string(),
        )
    };
    let asked = ("cond".to_string(), "fp8".to_string(), "f32".to_string());

    // Multipart (as the SDK and the portal send it) with every knob; JSON with the defaults
    // spelled out; and nothing at all.
    let v = create_multipart(
        &server,
        &[
            Part::Text("prompt", "fp8 weights, f32 vae"),
            Part::Text("frames", "5"),
            Part::Text("steps", "2"),
            Part::Text("offload", "cond"),
            Part::Text("weights", "fp8"),
            Part::Text("vae_dtype", "f32"),
        ],
    );
    assert_eq!(knobs(&v), asked, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let explicit = server.post_json(
        "/v1/videos",
        &json!({"prompt": "defaults spelled out", "frames": 5, "steps": 1,
                "weights": "bf16", "vae_dtype": "auto", "offload": "auto"}),
    );
    assert_eq!(explicit.status, 200, "{}", explicit.text());
    let defaults = server.post_json(
        "/v1/videos",
        &json!({"prompt": "no knobs", "frames": 5, "steps": 1}),
    );
    assert_eq!(defaults.status, 200, "{}", defaults.text());
    for v in [explicit.json(), defaults.json()] {
        assert_eq!(
            knobs(&v),
            ("auto".into(), "bf16".into(), "auto".into()),
            "{v}"
        );
    }

    // The worker is handed exactly what was asked for, and the job completes with it.
    let done = server.wait_finished(&id, JOB_TIMEOUT);
    assert_eq!(done["status"], "completed", "{done}\n{}", server.log());
    assert_eq!(knobs(&done), asked);
    let job_file = server.data_dir().join("jobs").join(&id).join("job.json");
    let job: Value = serde_json::from_slice(&std::fs::read(&job_file).unwrap()).unwrap();
    assert_eq!(
        (&job["offload"], &job["weights"], &job["vae_dtype"]),
        (&json!("cond"), &json!("fp8"), &json!("f32")),
        "{job}"
    );

    // Remix and extension carry them; neither accepts them as fields (the source's settings).
    let remix = server.post_json(
        &format!("/v1/videos/{id}/remix"),
        &json!({"prompt": "remixed"}),
    );
    assert_eq!(remix.status, 200, "{}", remix.text());
    let remix = remix.json();
    assert_eq!(knobs(&remix), asked, "{remix}");
    let msg = server
        .post_json(
            &format!("/v1/videos/{id}/remix"),
            &json!({"prompt": "p", "weights": "bf16"}),
        )
        .expect_error(400);
    assert!(msg.contains("weights: unknown field"), "{msg}");
    let ext = server.post_json(
        "/v1/videos/extensions",
        &json!({"prompt": "extended", "seconds": "0.3", "video": {"id": id}}),
    );
    assert_eq!(ext.status, 200, "{}", ext.text());
    let ext = ext.json();
    assert_eq!(knobs(&ext), asked, "{ext}");
    let msg = server
        .post_json(
            "/v1/videos/extensions",
            &json!({"prompt": "p", "video": {"id": id}, "vae_dtype": "f32"}),
        )
        .expect_error(400);
    assert!(msg.contains("vae_dtype: unknown field"), "{msg}");
    let remix_id = remix["id"].as_str().unwrap().to_string();
    let ext_id = ext["id"].as_str().unwrap().to_string();
    for other in [&remix_id, &ext_id] {
        let v = server.wait_finished(other, JOB_TIMEOUT);
        assert_eq!(v["status"], "completed", "{v}\n{}", server.log());
        let job = server.data_dir().join("jobs").join(other).join("job.json");
        let job: Value = serde_json::from_slice(&std::fs::read(job).unwrap()).unwrap();
        assert_eq!(
            (&job["weights"], &job["vae_dtype"]),
            (&json!("fp8"), &json!("f32"))
        );
    }
    let all = server.get("/v1/videos?limit=10").json();
    for v in all["data"].as_array().unwrap() {
        let _ = server.wait_finished(v["id"].as_str().unwrap(), JOB_TIMEOUT);
    }

    // Stored in SQLite: the same after a restart, and a remix made then still carries them.
    let server = server.restart();
    for other in [&id, &remix_id, &ext_id] {
        let v = server.get(&format!("/v1/videos/{other}")).json();
        assert_eq!(knobs(&v), asked, "{v}");
    }
    let again = server.post_json(
        &format!("/v1/videos/{remix_id}/remix"),
        &json!({"prompt": "after the restart"}),
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(knobs(&again.json()), asked);
}

#[test]
fn models_openapi_portal_and_health() {
    let server = Server::start("");
    let models = server.get("/v1/models").json();
    let demo = &models["data"][0];
    assert_eq!(demo["id"], "demo");
    assert_eq!(demo["sizes"], json!(["256x256", "320x192", "192x320"]));
    assert_eq!(demo["frames"]["rule"], "4k+1");
    assert_eq!(demo["fps"], 16);
    assert_eq!(demo["image_conditioning"], true);
    assert!(demo["steps"]["default"].is_u64());
    assert_eq!(demo["offload"]["default"], "auto");
    assert_eq!(demo["offload"]["values"][4], "stream");
    assert_eq!(
        demo["weights"],
        json!({"default": "bf16", "values": ["bf16", "fp8", "fp8-matmul"]})
    );
    assert_eq!(demo["vae_dtype"]["default"], "auto");
    // bf16 is offered only when the workers run on a GPU (the default of a CUDA build).
    let vae_values = if cfg!(feature = "cuda") {
        json!(["auto", "bf16", "f32"])
    } else {
        json!(["auto", "f32"])
    };
    assert_eq!(demo["vae_dtype"]["values"], vae_values);

    let spec = server.get("/openapi.json").json();
    assert_eq!(spec["openapi"], "3.1.0");
    // Every route the router serves (api.rs), with its methods, and nothing else.
    let routes = [
        ("/v1/videos", &["post", "get"][..]),
        ("/v1/videos/{id}", &["get", "delete"]),
        ("/v1/videos/{id}/content", &["get"]),
        ("/v1/videos/{id}/remix", &["post"]),
        ("/v1/videos/{id}/cancel", &["post"]),
        ("/v1/videos/{id}/events", &["get"]),
        ("/v1/videos/extensions", &["post"]),
        ("/v1/models", &["get"]),
        ("/metrics", &["get"]),
        ("/healthz", &["get"]),
        ("/openapi.json", &["get"]),
        ("/", &["get"]),
    ];
    assert_eq!(
        spec["paths"].as_object().unwrap().len(),
        routes.len(),
        "{}",
        spec["paths"]
    );
    for (path, methods) in routes {
        assert_eq!(
            spec["paths"][path].as_object().map(|m| m.len()),
            Some(methods.len()),
            "{path}"
        );
        for method in methods {
            assert!(
                spec["paths"][path][method].is_object(),
                "{method} {path} missing from openapi.json"
            );
        }
    }
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/app.js"));
    assert_eq!(server.get("/app.js").status, 200);
    assert_eq!(server.get("/healthz").json()["status"], "ok");
    server.get("/v1/nothing-here").expect_error(404);
}

#[test]
fn api_keys_are_required_when_configured() {
    let server = Server::start("api_keys = [\"sk-test-0123456789\"]");
    let msg = server.get("/v1/videos").expect_error(401);
    assert!(msg.contains("API key"), "{msg}");
    server
        .request(
            "GET",
            "/v1/videos",
            &[("Authorization", "Bearer sk-wrong-0123456789")],
            b"",
        )
        .expect_error(401);
    let ok = server.request(
        "GET",
        "/v1/videos",
        &[("Authorization", "Bearer sk-test-0123456789")],
        b"",
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    server.get("/metrics").expect_error(401);
    // The portal page itself loads (it asks for the key).
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn refuses_public_bind_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vidgen"))
        .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_unauthenticated"), "{err}");
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
