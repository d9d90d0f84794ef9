//! The queue over real HTTP: bounded (429 + Retry-After), cancel (queued and running), a worker
//! killed mid-job, a server restart with queued and running jobs, and SSE progress events.

mod server_support;

use std::time::Duration;

use serde_json::{json, Value};
use server_support::{long_job, read_events, Server};

const TIMEOUT: Duration = Duration::from_secs(300);

fn create(server: &Server, body: &Value) -> String {
    let resp = server.post_json("/v1/videos", body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["id"].as_str().unwrap().to_string()
}

/// Waits until the job's worker is inside the pipeline (a progress stage was reported).
fn wait_running(server: &Server, id: &str) -> Value {
    server.wait_for(id, TIMEOUT, |v| {
        assert_ne!(v["status"], "failed", "the long job failed: {v}");
        v["status"] == "in_progress" && !v["stage"].is_null()
    })
}

#[test]
fn full_queue_cancel_and_events() {
    let server = Server::start("[queue]\nmax_queued = 2\ncancel_grace_s = 2");
    let running = create(&server, &long_job());
    wait_running(&server, &running);
    let a = create(
        &server,
        &json!({"prompt": "queued a", "frames": 5, "steps": 1}),
    );
    let b = create(
        &server,
        &json!({"prompt": "queued b", "frames": 5, "steps": 1}),
    );

    // The third waiting job is refused with 429 and a Retry-After, and is not stored.
    let full = server.post_json("/v1/videos", &json!({"prompt": "one too many"}));
    let msg = full.expect_error(429);
    assert!(msg.contains("queue"), "{msg}");
    let retry: u64 = full
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry));
    assert_eq!(
        server.get("/v1/videos?limit=100").json()["data"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let queued = server.get(&format!("/v1/videos/{b}")).json();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["queue_position"], 1);

    // SSE on the running job: the current object first, then stage/step events as they come.
    let events = read_events(&server, &running, Duration::from_secs(180), |text| {
        text.contains("event: step")
    });
    assert!(
        events.starts_with("event: video") || events.contains("\nevent: video"),
        "{events}"
    );
    assert!(events.contains("event: step"), "{events}");
    assert!(events.contains("\"total\""), "{events}");

    // Cancel a queued job: failed/cancelled at once.
    let c = server.request("POST", &format!("/v1/videos/{a}/cancel"), &[], b"");
    assert_eq!(c.status, 200, "{}", c.text());
    let c = c.json();
    assert_eq!(c["status"], "failed");
    assert_eq!(c["error"]["code"], "cancelled");

    // Cancel the running job: it stops at its next step (or is killed after the grace).
    let c = server.request("POST", &format!("/v1/videos/{running}/cancel"), &[], b"");
    assert_eq!(c.status, 200, "{}", c.text());
    let v = server.wait_finished(&running, Duration::from_secs(60));
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(
        server.worker_pids().len() <= 1,
        "the cancelled worker is gone"
    );

    // The queue moves on: b runs to completion; events of a finished job end with `done`.
    let v = server.wait_finished(&b, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}");
    let events = read_events(&server, &b, Duration::from_secs(10), |t| {
        t.contains("event: done")
    });
    assert!(events.contains("event: done"), "{events}");
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("vidgen_job_failures_total{cause=\"cancelled\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vidgen_queue_rejected_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_killed_worker_fails_its_job_and_the_server_keeps_serving() {
    let server = Server::start("");
    let id = create(&server, &long_job());
    wait_running(&server, &id);
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 1, "one worker process per job: {workers:?}");
    let status = std::process::Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let v = server.wait_finished(&id, Duration::from_secs(60));
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "worker_crashed", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("SIGKILL"),
        "{v}"
    );
    // Still serving, and the next job runs.
    let next = create(
        &server,
        &json!({"prompt": "after the crash", "frames": 5, "steps": 1}),
    );
    let v = server.wait_finished(&next, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}");
    assert!(server
        .get("/metrics")
        .text()
        .contains("vidgen_job_failures_total{cause=\"worker_crashed\"} 1"));
}

#[test]
fn restart_keeps_queued_jobs_and_fails_the_interrupted_one() {
    let server = Server::start("");
    let running = create(&server, &long_job());
    wait_running(&server, &running);
    let queued = create(
        &server,
        &json!({"prompt": "waits for the restart", "frames": 5, "steps": 1}),
    );
    let worker = server.worker_pids();
    assert_eq!(worker.len(), 1);

    let server = server.restart();
    // The old worker does not outlive its job (it is killed or stops when its output pipe breaks).
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !std::path::Path::new(&format!("/proc/{}", worker[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", worker[0]))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "the interrupted worker is still running");

    let v = server.get(&format!("/v1/videos/{running}")).json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "interrupted", "{v}");
    let v = server.wait_finished(&queued, TIMEOUT);
    assert_eq!(v["status"], "completed", "{v}");
}

#[test]
fn restart_can_requeue_the_interrupted_job_once() {
    let server = Server::start("[queue]\nrequeue_interrupted = true");
    let running = create(
        &server,
        &json!({"prompt": "requeued", "frames": 81, "steps": 100, "size": "512x512"}),
    );
    wait_running(&server, &running);
    let server = server.restart();
    let v = server.wait_for(&running, Duration::from_secs(60), |v| {
        v["status"] != "queued"
    });
    assert_eq!(
        v["status"], "in_progress",
        "requeued and started again: {v}"
    );
    // Interrupted a second time: now it fails.
    wait_running(&server, &running);
    let server = server.restart();
    let v = server.get(&format!("/v1/videos/{running}")).json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "interrupted");
}
