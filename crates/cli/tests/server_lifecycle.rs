//! Worker and output lifecycles over real HTTP on the demo model: the warm worker (one process for
//! many jobs, replaced after it dies) and retention (finished outputs expire and are deleted).

mod server_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{ffprobe, long_job, Server};

const TIMEOUT: Duration = Duration::from_secs(300);

fn create(server: &Server, body: &Value) -> String {
    let resp = server.post_json("/v1/videos", body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["id"].as_str().unwrap().to_string()
}

fn small_job(seed: u64) -> Value {
    json!({"prompt": "a kite over a beach", "frames": 5, "steps": 2, "seed": seed})
}

fn content(server: &Server, id: &str) -> Vec<u8> {
    let resp = server.get(&format!("/v1/videos/{id}/content"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.body
}

#[test]
fn warm_worker_serves_jobs_in_one_process_and_is_replaced_after_a_kill() {
    let server = Server::start("[queue]\nwarm_worker = true");
    assert!(
        server.worker_pids().is_empty(),
        "no worker before the first job"
    );

    let first = create(&server, &small_job(3));
    let v = server.wait_finished(&first, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}\n{}", server.log());
    let warm = server.worker_pids();
    assert_eq!(
        warm.len(),
        1,
        "the warm worker stays after its job: {warm:?}"
    );

    // The same request again, in the same process: the same video (nothing leaks between jobs).
    let second = create(&server, &small_job(3));
    let v = server.wait_finished(&second, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(
        server.worker_pids(),
        warm,
        "one worker process for both jobs"
    );
    let (a, b) = (content(&server, &first), content(&server, &second));
    assert_eq!(
        a, b,
        "same settings and seed in the warm worker: same bytes"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("b.mp4"), &b).unwrap();
    assert_eq!(ffprobe(&tmp.path().join("b.mp4")).0, 5);

    // Killed mid-job: the job fails with the cause, and the next job gets a new worker.
    let long = create(&server, &long_job());
    server.wait_for(&long, TIMEOUT, |v| {
        v["status"] == "in_progress" && !v["stage"].is_null()
    });
    assert_eq!(server.worker_pids(), warm);
    let killed = std::process::Command::new("kill")
        .args(["-9", &warm[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let v = server.wait_finished(&long, Duration::from_secs(60));
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "worker_crashed", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("SIGKILL"),
        "{v}"
    );

    let third = create(&server, &small_job(4));
    let v = server.wait_finished(&third, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}\n{}", server.log());
    let fresh = server.worker_pids();
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert_ne!(fresh, warm, "a new warm worker replaced the killed one");
    assert!(server
        .get("/metrics")
        .text()
        .contains("vidgen_job_failures_total{cause=\"worker_crashed\"} 1"));
}

#[test]
fn finished_outputs_expire_and_are_deleted() {
    // 0.0005 h = 1.8 s, stored rounded to 2 s; the sweeper then checks every second.
    let server = Server::start("retention_hours = 0.0005");
    let id = create(&server, &small_job(8));
    let v = server.wait_finished(&id, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}");
    let completed = v["completed_at"].as_i64().unwrap();
    // Both stamps are whole seconds taken a moment apart.
    let lifetime = v["expires_at"].as_i64().unwrap() - completed;
    assert!((1..=2).contains(&lifetime), "{v}");
    assert_eq!(v["expired"], false);
    let job_dir = server.data_dir().join("jobs").join(&id);

    let start = Instant::now();
    let v = server.wait_for(&id, Duration::from_secs(8), |v| v["expired"] == true);
    assert!(start.elapsed() < Duration::from_secs(8));
    // The record stays (status as it ended, `expired: true`); the files are gone.
    assert_eq!(v["status"], "completed", "{v}");
    assert!(!job_dir.exists(), "outputs deleted: {job_dir:?}");
    for variant in ["video", "thumbnail", "spritesheet"] {
        let resp = server.get(&format!("/v1/videos/{id}/content?variant={variant}"));
        let msg = resp.expect_error(410);
        assert!(msg.contains("expired"), "{msg}");
        assert_eq!(resp.json()["error"]["code"], "expired");
    }
    let msg = server
        .post_json(
            &format!("/v1/videos/{id}/remix"),
            &json!({"prompt": "again"}),
        )
        .expect_error(400);
    assert!(msg.contains("expired"), "{msg}");
    let msg = server
        .post_json(
            "/v1/videos/extensions",
            &json!({"prompt": "more", "video": {"id": id}}),
        )
        .expect_error(400);
    assert!(msg.contains("expired"), "{msg}");
    assert!(
        server.log().contains("outputs expired and deleted"),
        "{}",
        server.log()
    );
    // Deleting the record still works.
    let del = server.request("DELETE", &format!("/v1/videos/{id}"), &[], b"");
    assert_eq!(del.status, 200, "{}", del.text());
}
