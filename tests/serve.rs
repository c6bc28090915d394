//! The HTTP service on an ephemeral loopback port: every route, every error, batching,
//! graceful stop, and the page in a real headless browser (when Chromium is installed).

mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use burn::tensor::Device;
use inception::Bundle;
use inception::models::{Model, ModelConfig, ModelKind};
use inception::predict::{EngineKind, Predictor};
use inception::serve::{Running, ServeConfig, start};

fn sample() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/samples/bag_18.png")).unwrap()
}

fn demo(cfg: ServeConfig) -> Running {
    let b = Bundle::demo(&Device::flex()).unwrap();
    let p = Predictor::new(b.model.clone(), EngineKind::Fast, &Device::flex());
    start(b, p, ServeConfig { addr: "127.0.0.1:0".parse().unwrap(), ..cfg }).unwrap()
}

fn url(r: &Running, path: &str) -> String {
    format!("http://{}{path}", r.addr)
}

fn post(r: &Running, path: &str, body: &[u8]) -> (u16, String, Option<String>) {
    let resp = ureq::post(&url(r, path)).timeout(Duration::from_secs(60)).send_bytes(body);
    match resp {
        Ok(x) => (x.status(), x.into_string().unwrap(), None),
        Err(ureq::Error::Status(code, x)) => {
            let retry = x.header("retry-after").map(str::to_string);
            (code, x.into_string().unwrap_or_default(), retry)
        }
        Err(e) => panic!("{e}"),
    }
}

fn get(r: &Running, path: &str) -> (u16, String) {
    let x = ureq::get(&url(r, path)).call().unwrap();
    (x.status(), x.into_string().unwrap())
}

#[test]
fn every_route_answers() {
    let r = demo(ServeConfig::default());
    assert_eq!(get(&r, "/healthz"), (200, "ok\n".into()));
    let (s, page) = get(&r, "/");
    assert_eq!(s, 200);
    assert!(page.contains("<html") && page.contains("/v1/classify"));
    let (_, models) = get(&r, "/v1/models");
    let m: serde_json::Value = serde_json::from_str(&models).unwrap();
    assert_eq!(m["models"][0]["name"], "inception_resnet_v1");
    assert_eq!(m["models"][0]["classes"][8], "Bag");
    assert_eq!(m["models"][0]["preprocess"]["input_size"], 75);
    // raw bytes
    let (s, body, _) = post(&r, "/v1/classify?top=3&crop=1", &sample());
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
    assert_eq!(v["top"][0]["name"], "Bag");
    assert!(v["crop"].as_str().unwrap().starts_with("data:image/png;base64,"));
    // multipart
    let boundary = "XyZ";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    form.extend(sample());
    form.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let x = ureq::post(&url(&r, "/v1/classify"))
        .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
        .send_bytes(&form)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&x.into_string().unwrap()).unwrap();
    assert_eq!(v["top"].as_array().unwrap().len(), 5);
    // embed
    let (s, body, _) = post(&r, "/v1/embed", &sample());
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dim"].as_u64(), Some(v["embedding"].as_array().unwrap().len() as u64));
    // metrics
    let (_, metrics) = get(&r, "/metrics");
    assert!(metrics.contains("inception_requests_total{route=\"/v1/classify\",status=\"200\"} 2"), "{metrics}");
    assert!(metrics.contains("inception_request_duration_seconds_bucket"));
    assert!(metrics.contains("inception_queue_depth 0"));
    assert!(metrics.contains("inception_batches_total{size=\"1\"}"));
    r.stop().unwrap();
}

#[test]
fn bad_requests_get_clear_statuses() {
    let r = demo(ServeConfig { max_body: 64 << 10, ..ServeConfig::default() });
    let (s, body, _) = post(&r, "/v1/classify", b"not an image");
    assert_eq!(s, 400);
    assert!(body.contains("cannot decode image"), "{body}");
    let (s, _, _) = post(&r, "/v1/classify", &vec![7u8; 80 << 10]);
    assert_eq!(s, 413);
    let (s, body, _) = post(&r, "/v1/classify?top=0", &sample());
    assert_eq!(s, 400, "{body}");
    let (s, _, _) = post(&r, "/v1/classify", &[]);
    assert_eq!(s, 400);
    // a 1 x 2,000,000 PNG header: refused before decoding
    let path = common::unique_temp_dir("serve-big").with_extension("png");
    {
        let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut enc = png::Encoder::new(f, 1, 2_000_000);
        enc.set_color(png::ColorType::Grayscale);
        let mut w = enc.write_header().unwrap().into_stream_writer().unwrap();
        std::io::Write::write_all(&mut w, &vec![0u8; 4_000_000]).unwrap();
        w.finish().unwrap();
    }
    let big = std::fs::read(&path).unwrap();
    let (s, body, _) = post(&r, "/v1/classify", &big);
    assert_eq!(s, 400, "{body}");
    // still healthy after all that
    assert_eq!(post(&r, "/v1/classify", &sample()).0, 200);
    r.stop().unwrap();
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    // a slow model (IR-v2 at half width, 299 px) and room for one waiting request
    let cfg = ModelConfig { width: 0.5, ..ModelConfig::new(ModelKind::InceptionResnetV2, 10) };
    let m = Model::new(&cfg, &Device::flex());
    let b = Bundle {
        model: m.clone(),
        pre: ModelKind::InceptionResnetV2.pretrained().pre,
        classes: vec![],
        source: "test".into(),
        int8: None,
    };
    let p = Predictor::new(m, EngineKind::Fast, &Device::flex());
    let r =
        start(b, p, ServeConfig { addr: "127.0.0.1:0".parse().unwrap(), queue: 1, max_batch: 1, ..Default::default() })
            .unwrap();
    let img = sample();
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    let (code, _, retry) = post(&r, "/v1/classify", &img);
                    (code, retry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = results.iter().filter(|(c, _)| *c == 503).collect();
    assert!(!busy.is_empty(), "{results:?}");
    assert!(busy.iter().all(|(_, retry)| retry.as_deref() == Some("1")));
    assert!(results.iter().any(|(c, _)| *c == 200));
    assert!(results.iter().all(|(c, _)| *c == 200 || *c == 503), "{results:?}");
    r.stop().unwrap();
}

#[test]
fn concurrent_requests_are_batched_and_stop_finishes_in_flight_work() {
    let r = demo(ServeConfig { max_batch: 8, batch_window: Duration::from_millis(50), ..ServeConfig::default() });
    let img = sample();
    let addr = r.addr;
    let codes: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    ureq::post(&format!("http://{addr}/v1/classify")).send_bytes(&img).map(|x| x.status()).unwrap_or(0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let (_, metrics) = get(&r, "/metrics");
    let batched = metrics
        .lines()
        .filter(|l| l.starts_with("inception_batches_total{size=\""))
        .any(|l| !l.starts_with("inception_batches_total{size=\"1\"}"));
    assert!(batched, "no batch of more than one request: {metrics}");
    // a request in flight when stop is called still gets its answer
    let pending = std::thread::spawn(move || {
        ureq::post(&format!("http://{addr}/v1/classify")).send_bytes(&sample()).map(|x| x.status()).unwrap_or(0)
    });
    std::thread::sleep(Duration::from_millis(5));
    r.stop().unwrap();
    assert_eq!(pending.join().unwrap(), 200);
    assert!(std::net::TcpStream::connect(addr).is_err(), "still accepting after stop");
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[test]
fn the_page_shows_the_top5_in_a_real_browser() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium on this machine (.ci/run installs it)");
        return;
    };
    let r = demo(ServeConfig::default());
    let profile = common::unique_temp_dir("chromium-profile");
    let mut child = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=15000",
            "--dump-dom",
            &url(&r, "/#demo"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut dom = String::new();
    child.stdout.take().unwrap().read_to_string(&mut dom).unwrap();
    let _ = child.wait();
    r.stop().unwrap();
    assert!(dom.contains("data-done=\"yes\""), "the page did not finish: {dom}");
    assert_eq!(dom.matches("class=\"row result\"").count(), 5, "{dom}");
    assert!(dom.contains("class=\"prob\""), "{dom}");
    assert!(dom.contains("data:image/png;base64,"), "the crop is shown");
}

#[test]
fn sigterm_stops_the_binary_cleanly() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_inception"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).unwrap().split('/').next().unwrap().to_string();
    let x = ureq::post(&format!("http://{addr}/v1/classify")).send_bytes(&sample()).unwrap();
    assert_eq!(x.status(), 200);
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}
