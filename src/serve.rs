//! `inception serve`: an HTTP service in front of one model.
//!
//! Requests are decoded and preprocessed on tokio's blocking pool (never on the engine
//! thread), then queued to one engine thread, which batches what is waiting (up to
//! `max_batch`, waiting at most `batch_window` for more) into one forward pass. A full queue
//! answers 503 with `Retry-After`; bodies over the limit 413; an undecodable image 400 with the
//! reason. SIGTERM / Ctrl-C stop accepting, finish what is in flight, and return.
//!
//! Routes: `GET /` (a page: drop an image, see the top-5 and the crop the network saw),
//! `POST /v1/classify[?top=K&crop=1]`, `POST /v1/embed` (raw image bytes or multipart form
//! data), `GET /v1/models`, `GET /healthz`, `GET /metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::commands::{Class, top_k};
use crate::error::{Error, Result};
use crate::predict::Predictor;
use crate::preprocess::Preprocess;

/// How the service runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Most requests in one forward pass.
    pub max_batch: usize,
    /// How long the engine waits for more requests once one is there.
    pub batch_window: Duration,
    /// Requests waiting for the engine before new ones get 503.
    pub queue: usize,
    /// Largest request body in bytes (413 above).
    pub max_body: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_batch: 8,
            batch_window: Duration::from_millis(2),
            queue: 64,
            max_body: 20 << 20,
        }
    }
}

/// What the engine is asked for.
enum Want {
    Logits,
    Embedding,
}

struct Job {
    input: Vec<f32>,
    want: Want,
    reply: tokio::sync::oneshot::Sender<std::result::Result<Vec<f32>, String>>,
}

/// Latency histogram buckets (seconds), Prometheus style.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Metrics {
    /// `(route, status) -> count`
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<(Vec<u64>, f64, u64)>,
    batches: Mutex<BTreeMap<usize, u64>>,
    queued: AtomicU64,
}

impl Metrics {
    fn observe(&self, route: &str, status: StatusCode, secs: f64) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_string(), status.as_u16())).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            if l.0.is_empty() {
                l.0 = vec![0; BUCKETS.len()];
            }
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    l.0[i] += 1;
                }
            }
            l.1 += secs;
            l.2 += 1;
        }
    }

    fn render(&self) -> String {
        let mut s = String::new();
        s += "# HELP inception_requests_total Requests by route and status.\n# TYPE inception_requests_total counter\n";
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                s += &format!("inception_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n");
            }
        }
        s += "# HELP inception_request_duration_seconds Request latency.\n# TYPE inception_request_duration_seconds histogram\n";
        if let Ok(l) = self.latency.lock() {
            for (i, b) in BUCKETS.iter().enumerate() {
                s += &format!(
                    "inception_request_duration_seconds_bucket{{le=\"{b}\"}} {}\n",
                    l.0.get(i).copied().unwrap_or(0)
                );
            }
            s += &format!("inception_request_duration_seconds_bucket{{le=\"+Inf\"}} {}\n", l.2);
            s += &format!(
                "inception_request_duration_seconds_sum {}\ninception_request_duration_seconds_count {}\n",
                l.1, l.2
            );
        }
        s += "# HELP inception_queue_depth Requests waiting for the engine.\n# TYPE inception_queue_depth gauge\n";
        s += &format!("inception_queue_depth {}\n", self.queued.load(Ordering::Relaxed));
        s += "# HELP inception_batches_total Forward passes by batch size.\n# TYPE inception_batches_total counter\n";
        if let Ok(b) = self.batches.lock() {
            for (size, n) in b.iter() {
                s += &format!("inception_batches_total{{size=\"{size}\"}} {n}\n");
            }
        }
        s
    }
}

/// What the handlers share.
struct AppState {
    jobs: SyncSender<Job>,
    model: &'static str,
    config: crate::models::ModelConfig,
    source: String,
    pre: Preprocess,
    classes: Vec<String>,
    max_body: usize,
    metrics: Arc<Metrics>,
}

/// The engine thread: take what is queued, up to `max_batch` within `window`, run it as one
/// batch, answer each request. A panic inside a forward pass answers 500, never wedges.
fn engine_loop(p: Predictor, jobs: Receiver<Job>, pre: Preprocess, cfg: ServeConfig, metrics: Arc<Metrics>) {
    let s = pre.input_size;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + cfg.batch_window;
        while batch.len() < cfg.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match jobs.recv_timeout(left) {
                Ok(j) => batch.push(j),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
        if let Ok(mut b) = metrics.batches.lock() {
            *b.entry(batch.len()).or_default() += 1;
        }
        let n = batch.len();
        let x: Vec<f32> = batch.iter().flat_map(|j| j.input.iter().copied()).collect();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.run(&x, [n, 3, s, s], false)));
        match out {
            Ok(o) => {
                let (lc, ec) = (o.logits.data.len() / n, o.embedding.data.len() / n);
                for (i, j) in batch.into_iter().enumerate() {
                    let v = match j.want {
                        Want::Logits => o.logits.data[i * lc..(i + 1) * lc].to_vec(),
                        Want::Embedding => o.embedding.data[i * ec..(i + 1) * ec].to_vec(),
                    };
                    let _ = j.reply.send(Ok(v));
                }
            }
            Err(_) => {
                for j in batch {
                    let _ = j.reply.send(Err("the forward pass failed".into()));
                }
            }
        }
    }
}

type Reply = (StatusCode, Response);

fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
    (status, (status, axum::Json(serde_json::json!({ "error": msg.into() }))).into_response())
}

/// The image bytes of a request: the raw body, or the first file field of a multipart form.
async fn image_bytes(state: &Arc<AppState>, req: Request) -> std::result::Result<Bytes, Reply> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body over {} bytes", state.max_body));
    let too_big = |e: &dyn std::fmt::Display| {
        let m = e.to_string();
        if m.contains("length limit") || m.contains("too large") {
            too_large()
        } else {
            error(StatusCode::BAD_REQUEST, m)
        }
    };
    if multipart {
        let mut form =
            Multipart::from_request(req, &()).await.map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        return match form.next_field().await {
            Ok(Some(field)) => field.bytes().await.map_err(|e| too_big(&e)),
            Ok(None) => Err(error(StatusCode::BAD_REQUEST, "multipart form without a file")),
            Err(e) => Err(too_big(&e)),
        };
    }
    Bytes::from_request(req, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    })
}

/// Decode + preprocess off the async threads; the normalised input and the crop it came from.
async fn prepare(state: &Arc<AppState>, bytes: Bytes) -> std::result::Result<(Vec<f32>, image::RgbImage), Reply> {
    let pre = state.pre.clone();
    let r = tokio::task::spawn_blocking(move || {
        let img = crate::preprocess::decode_rgb(&bytes)?;
        let view = pre.view(&img);
        Ok::<_, String>((crate::preprocess::to_tensor(&view, pre.mean, pre.std), view))
    })
    .await;
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(reason)) => Err(error(StatusCode::BAD_REQUEST, format!("cannot decode image: {reason}"))),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "preprocessing failed")),
    }
}

/// Queue one input to the engine and wait for its answer.
async fn infer(state: &Arc<AppState>, input: Vec<f32>, want: Want) -> std::result::Result<Vec<f32>, Reply> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match state.jobs.try_send(Job { input, want, reply: tx }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            state.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let (s, mut r) = error(StatusCode::SERVICE_UNAVAILABLE, "the queue is full; retry shortly");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err((s, r));
        }
    }
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) => Err(error(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped")),
    }
}

#[derive(Deserialize)]
struct ClassifyQuery {
    top: Option<usize>,
    crop: Option<u8>,
}

#[derive(Serialize)]
struct ClassifyReply {
    model: String,
    top: Vec<Class>,
    /// The center crop the network saw, as a PNG data URL (with `crop=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    crop: Option<String>,
}

fn png_data_url(img: &image::RgbImage) -> Option<String> {
    use base64::Engine as _;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).ok()?;
    Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)))
}

async fn classify(State(state): State<Arc<AppState>>, Query(q): Query<ClassifyQuery>, req: Request) -> Response {
    let t0 = Instant::now();
    let r: std::result::Result<Reply, Reply> = async {
        let k = q.top.unwrap_or(5);
        if k == 0 || k > 100_000 {
            return Err(error(StatusCode::BAD_REQUEST, "top must be in 1..=100000"));
        }
        let bytes = image_bytes(&state, req).await?;
        let (input, view) = prepare(&state, bytes).await?;
        let logits = infer(&state, input, Want::Logits).await?;
        let top =
            top_k(&state.classes, &logits, k).map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let crop = if q.crop == Some(1) { png_data_url(&view) } else { None };
        let model = state.model.to_string();
        Ok((StatusCode::OK, axum::Json(ClassifyReply { model, top, crop }).into_response()))
    }
    .await;
    let (status, resp) = r.unwrap_or_else(|e| e);
    state.metrics.observe("/v1/classify", status, t0.elapsed().as_secs_f64());
    resp
}

async fn embed(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let r: std::result::Result<Reply, Reply> = async {
        let bytes = image_bytes(&state, req).await?;
        let (input, _) = prepare(&state, bytes).await?;
        let e = infer(&state, input, Want::Embedding).await?;
        if e.iter().any(|v| !v.is_finite()) {
            return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "non-finite embedding"));
        }
        let body = serde_json::json!({ "model": state.model, "dim": e.len(), "embedding": e });
        Ok((StatusCode::OK, axum::Json(body).into_response()))
    }
    .await;
    let (status, resp) = r.unwrap_or_else(|e| e);
    state.metrics.observe("/v1/embed", status, t0.elapsed().as_secs_f64());
    resp
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let body = serde_json::json!({ "models": [{
        "name": state.model,
        "config": state.config,
        "preprocess": state.pre,
        "classes": state.classes,
        "source": state.source,
    }]});
    state.metrics.observe("/v1/models", StatusCode::OK, 0.0);
    axum::Json(body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

const PAGE: &str = include_str!("../assets/serve/index.html");

/// A running service: its address, and `stop` to end it gracefully.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stop accepting, finish in-flight requests, wait for the server thread.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Invalid("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Start the service on its own threads (tokio runtime + engine). `cfg.addr` with port 0 picks
/// a free port (see `Running::addr`).
pub fn start(bundle: Bundle, predictor: Predictor, cfg: ServeConfig) -> Result<Running> {
    if cfg.max_batch == 0 || cfg.queue == 0 || cfg.max_body == 0 {
        return Err(Error::Invalid("max_batch, queue and max_body must be >= 1".into()));
    }
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = sync_channel::<Job>(cfg.queue);
    let pre = bundle.pre.clone();
    {
        let (pre, cfg, metrics) = (pre.clone(), cfg.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("inception-engine".into())
            .spawn(move || engine_loop(predictor, rx, pre, cfg, metrics))
            .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?;
    }
    let state = Arc::new(AppState {
        jobs: tx,
        model: bundle.model.kind().name(),
        config: bundle.model.config(),
        source: bundle.source,
        pre,
        classes: bundle.classes,
        max_body: cfg.max_body,
        metrics,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(cfg.addr))
        .map_err(|err| Error::Io { path: cfg.addr.to_string().into(), err })?;
    let addr = listener.local_addr().map_err(|err| Error::Io { path: cfg.addr.to_string().into(), err })?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state, cfg.max_body);
    let thread = std::thread::Builder::new()
        .name("inception-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let shutdown = async move {
                    let term = async {
                        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                            Ok(mut s) => {
                                s.recv().await;
                            }
                            Err(_) => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {},
                        _ = term => {},
                        _ = tokio::signal::ctrl_c() => {},
                    }
                };
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(|err| Error::Io { path: addr.to_string().into(), err })
            })
        })
        .map_err(|e| Error::Invalid(format!("cannot start the server thread: {e}")))?;
    Ok(Running { addr, stop: Some(stop_tx), thread: Some(thread) })
}

/// Serve until SIGTERM / Ctrl-C; returns once in-flight requests are answered.
pub fn serve(bundle: Bundle, predictor: Predictor, cfg: ServeConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let mut running = start(bundle, predictor, cfg)?;
    on_ready(running.addr);
    match running.thread.take().map(|t| t.join()) {
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(Error::Invalid("the server thread panicked".into())),
        None => Ok(()),
    }
}
