//! The portal in headless Chromium (driven through chromedriver's WebDriver JSON API): load the
//! page served by the binary, submit a job on the demo model with the form, see it progress and
//! finish, and the finished video load in the page's player. The memory and precision selects
//! (`offload`, `weights`, `vae_dtype`) are filled from /v1/models and reach the job.

mod server_support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{request, Server};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists(),
            "the portal test needs Debian's chromium and chromium-driver (.ci/run installs them)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut driver = Driver {
            child,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--autoplay-policy=no-user-gesture-required",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!(
            "--user-data-dir={}",
            driver._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let resp = driver.call("POST", "/session", &caps);
        driver.session = resp["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{resp}"))
            .to_string();
        driver
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = if method == "GET" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let resp = request(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json; charset=utf-8")],
            &body,
        );
        let v = resp.json();
        assert_eq!(resp.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: &Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn script(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            &json!({"script": script, "args": []}),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            &json!({"using": "css selector", "value": css}),
        );
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.element(css);
        self.session_call("POST", &format!("/element/{el}/clear"), &json!({}));
        self.session_call(
            "POST",
            &format!("/element/{el}/value"),
            &json!({"text": text}),
        );
    }

    fn wait_until(&self, what: &str, timeout: Duration, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.script(script);
            if v.as_bool() != Some(false) && !v.is_null() {
                return v;
            }
            if start.elapsed() > timeout {
                let page = self.script("return document.body.innerText;");
                panic!(
                    "timed out waiting for {what}; page text:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn portal_submits_a_job_and_plays_the_result() {
    let server = Server::start("");
    let driver = Driver::start();
    driver.session_call(
        "POST",
        "/url",
        &json!({"url": format!("http://{}/", server.addr)}),
    );

    // The form is filled from /v1/models.
    driver.wait_until(
        "the model list",
        Duration::from_secs(30),
        "return document.querySelectorAll('#model option').length > 0 && \
                document.getElementById('frames').value !== '';",
    );
    assert_eq!(
        driver.script("return document.getElementById('model').value;"),
        "demo"
    );
    assert_eq!(
        driver.script("return document.getElementById('size').value;"),
        "256x256"
    );

    driver.type_into("#prompt", "a paper boat on a pond");
    driver.type_into("#frames", "9");
    driver.type_into("#steps", "3");
    driver.type_into("#seed", "7");
    // The memory and precision selects offer what /v1/models lists, its default selected.
    let models = server.get("/v1/models").json();
    for id in ["offload", "weights", "vae_dtype"] {
        let shown = driver.script(&format!(
            "const s = document.getElementById('{id}'); \
             return {{values: [...s.options].map((o) => o.value), selected: s.value}};"
        ));
        assert_eq!(shown["values"], models["data"][0][id]["values"], "{id}");
        assert_eq!(shown["selected"], models["data"][0][id]["default"], "{id}");
    }
    let weights = driver.element("#weights option[value='fp8']");
    driver.session_call("POST", &format!("/element/{weights}/click"), &json!({}));
    let vae = driver.element("#vae_dtype option[value='f32']");
    driver.session_call("POST", &format!("/element/{vae}/click"), &json!({}));
    let submit = driver.element("#submit");
    driver.session_call("POST", &format!("/element/{submit}/click"), &json!({}));

    // The job appears in the queue, then finishes with a player holding the video.
    let id = driver.wait_until(
        "the job in the queue",
        Duration::from_secs(30),
        "const j = document.querySelector('.job'); return j ? j.dataset.id : null;",
    );
    let id = id.as_str().unwrap().to_string();
    let err = driver.script("return document.getElementById('form-error').textContent;");
    assert_eq!(err, "", "the form reported an error");
    let outcome = driver.wait_until(
        "the finished video in the player",
        Duration::from_secs(300),
        "const j = document.querySelector('.job'); if (!j) return false; \
         if (j.dataset.status === 'failed') return 'failed: ' + j.innerText; \
         const v = j.querySelector('video'); return v && v.readyState >= 1 ? true : false;",
    );
    assert_eq!(outcome, true, "{outcome}");
    let duration = driver.script("return document.querySelector('.job video').duration;");
    let duration = duration.as_f64().unwrap();
    assert!(
        (duration - 9.0 / 16.0).abs() < 0.1,
        "player duration {duration}"
    );
    let meta = driver.script("return document.querySelector('.job .meta').textContent;");
    assert!(meta.as_str().unwrap().contains("9 frames"), "{meta}");
    let download =
        driver.script("return document.querySelector('.job a.download').getAttribute('download');");
    assert_eq!(download, format!("{id}.mp4").as_str());

    // The server agrees.
    let v = server.get(&format!("/v1/videos/{id}")).json();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["prompt"], "a paper boat on a pond");
    assert_eq!(
        (
            v["frames"].as_u64(),
            v["steps"].as_u64(),
            v["seed"].as_u64()
        ),
        (Some(9), Some(3), Some(7))
    );
    assert_eq!(
        (&v["offload"], &v["weights"], &v["vae_dtype"]),
        (&json!("auto"), &json!("fp8"), &json!("f32")),
        "{v}"
    );
}
