//! Faces against facenet-pytorch: the three MTCNN nets, the pyramid's area resampling,
//! detections on real photos (boxes, probabilities, landmarks), `extract_face` crops; then the
//! `inception faces` commands end to end with random Inception-ResNet-v1 weights, and bad input.
//! Fixtures: scripts/reference/make_faces.py.

mod common;

use common::{run, s, text};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;
use inception::faces::{self, DetectConfig, Face, Mtcnn, Selection, align, mtcnn};
use inception::models::{Model, ModelConfig, ModelKind};
use inception::{preprocess, weights};

fn dir() -> PathBuf {
    common::fixtures().join("faces")
}

fn reference() -> &'static Vec<u8> {
    static R: OnceLock<Vec<u8>> = OnceLock::new();
    R.get_or_init(|| std::fs::read(dir().join("reference.safetensors")).unwrap())
}

fn tensor(key: &str) -> weights::FileTensor {
    let p = dir().join("reference.safetensors");
    let st = weights::parse(&p, reference()).unwrap();
    weights::tensor_f32(&p, &st, key).unwrap()
}

fn detector() -> &'static Mtcnn {
    static M: OnceLock<Mtcnn> = OnceLock::new();
    M.get_or_init(|| Mtcnn::new(DetectConfig::default()).unwrap())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn nets_match_facenet_pytorch() {
    let cases: [(&str, &[&str]); 4] = [
        ("pnet", &["reg", "prob"]),
        ("pnet-planar", &["reg", "prob"]),
        ("rnet", &["reg", "prob"]),
        ("onet", &["reg", "landmarks", "prob"]),
    ];
    for (which, outs) in cases {
        let net = &which[..4];
        let x = tensor(&format!("{net}.input"));
        let got = mtcnn::raw::run(detector(), which, &x.data, x.shape[..].try_into().unwrap());
        for (o, g) in outs.iter().zip(&got) {
            let want = tensor(&format!("{net}.{o}"));
            let d = max_diff(g, &want.data);
            assert!(d < 1e-5, "{which}.{o}: max diff {d}");
        }
    }
}

#[test]
fn area_resampling_matches_torch_interpolate() {
    let x = tensor("area.input"); // [1, 3, 57, 83], 0..255
    let (h, w) = (57, 83);
    let mut hwc = vec![0.0; h * w * 3];
    for c in 0..3 {
        for p in 0..h * w {
            hwc[p * 3 + c] = x.data[c * h * w + p];
        }
    }
    let img = mtcnn::Pixels { data: &hwc, h, w };
    for (key, rows, cols, out) in [("area.down", (0, 57), (0, 83), (23, 35)), ("area.up", (3, 17), (5, 14), (24, 24))] {
        let mut got = vec![0.0; out.0 * out.1 * 3];
        mtcnn::area_resize(&img, rows, cols, out, false, mtcnn::Layout::Hwc, &mut got);
        let want = tensor(key);
        let mut want_hwc = vec![0.0; got.len()];
        for c in 0..3 {
            for p in 0..out.0 * out.1 {
                want_hwc[p * 3 + c] = want.data[c * out.0 * out.1 + p];
            }
        }
        let d = max_diff(&got, &want_hwc);
        assert!(d < 1e-3, "{key}: max diff {d}");
    }
}

#[derive(serde::Deserialize)]
struct RefImage {
    image: String,
    faces: Vec<Face>,
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

/// The criterion: every reference face with prob >= 0.9 found with IoU >= 0.9 and
/// landmarks within 3 px; no extra face with prob >= 0.9.
#[test]
fn detections_match_facenet_pytorch_on_photos() {
    let refs: Vec<RefImage> = serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
    assert!(refs.len() >= 8);
    let (mut faces_checked, mut worst_iou, mut worst_lm, mut worst_prob) = (0, 1.0f32, 0.0f32, 0.0f32);
    for r in &refs {
        let img = preprocess::load_rgb(&dir().join(&r.image)).unwrap();
        let got = detector().detect(&img);
        let strong: Vec<&Face> = r.faces.iter().filter(|f| f.prob >= 0.9).collect();
        let mut used = vec![false; got.len()];
        for f in &strong {
            let (j, best) = got
                .iter()
                .enumerate()
                .map(|(j, g)| (j, iou(&g.bbox, &f.bbox)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or_else(|| panic!("{}: no face found", r.image));
            assert!(best >= 0.9, "{}: best IoU {best}", r.image);
            used[j] = true;
            let lm = got[j]
                .landmarks
                .iter()
                .zip(&f.landmarks)
                .map(|(a, b)| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt())
                .fold(0.0, f32::max);
            assert!(lm <= 3.0, "{}: landmarks off by {lm} px", r.image);
            worst_iou = worst_iou.min(best);
            worst_lm = worst_lm.max(lm);
            worst_prob = worst_prob.max((got[j].prob - f.prob).abs());
            faces_checked += 1;
        }
        for (g, u) in got.iter().zip(&used) {
            assert!(*u || g.prob < 0.9, "{}: extra face {g:?}", r.image);
        }
        if r.faces.is_empty() {
            assert!(got.is_empty(), "{}: faces in a photo without one: {got:?}", r.image);
        }
    }
    eprintln!("{faces_checked} faces: worst IoU {worst_iou}, landmarks {worst_lm} px, prob {worst_prob}");
    assert!(faces_checked >= 10);
}

#[test]
fn extract_face_matches_facenet_pytorch() {
    let refs: Vec<RefImage> = serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
    for name in ["obama2", "astronaut", "group"] {
        let r = refs.iter().find(|r| r.image == format!("{name}.jpg")).unwrap();
        let img = preprocess::load_rgb(&dir().join(&r.image)).unwrap();
        let crop = align::extract_face(&img, &r.faces[0].bbox, 160, 0.0).unwrap();
        let p = dir().join("reference.safetensors");
        let st = weights::parse(&p, reference()).unwrap();
        let want = st.tensor(&format!("extract.{name}")).unwrap(); // u8 [3, 160, 160]
        assert_eq!(want.shape(), [3, 160, 160]);
        let mut worst = 0.0f32;
        for (x, y, p) in crop.enumerate_pixels() {
            for c in 0..3 {
                let w = want.data()[(c * 160 + y as usize) * 160 + x as usize] as f32;
                worst = worst.max((p.0[c] as f32 - w).abs());
            }
        }
        assert!(worst <= 1.0, "{name}: crop differs by {worst}");
    }
}

#[test]
fn blank_tiny_and_noisy_images_give_no_faces() {
    let m = detector();
    assert!(m.detect(&image::RgbImage::new(5, 5)).is_empty());
    assert!(m.detect(&image::RgbImage::new(1, 400)).is_empty());
    assert!(m.detect(&image::RgbImage::from_pixel(300, 200, image::Rgb([128, 128, 128]))).is_empty());
    let noise = common::det_uniform("faces-noise", 256 * 256 * 3);
    let img = image::RgbImage::from_raw(256, 256, noise.iter().map(|v| (v * 255.0) as u8).collect()).unwrap();
    for f in m.detect(&img) {
        assert!(f.prob.is_finite() && f.bbox.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn selection_rules() {
    let face = |b: [f32; 4], prob: f32| Face { bbox: b, prob, landmarks: [[0.0; 2]; 5] };
    let faces = vec![
        face([0.0, 0.0, 100.0, 100.0], 0.85),    // largest, weak
        face([180.0, 80.0, 220.0, 120.0], 0.99), // centred, most probable
        face([300.0, 0.0, 360.0, 60.0], 0.95),
    ];
    let dims = (400, 200);
    assert_eq!(faces::select(&faces, Selection::Largest, dims), Some(0));
    assert_eq!(faces::select(&faces, Selection::Probability, dims), Some(1));
    assert_eq!(faces::select(&faces, Selection::LargestOverThreshold, dims), Some(2));
    assert_eq!(faces::select(&faces, Selection::CenterWeightedSize, dims), Some(1));
    assert_eq!(faces::select(&[], Selection::Largest, dims), None);
    assert_eq!(faces::select(&faces[..1], Selection::LargestOverThreshold, dims), None);
}

#[test]
fn landmark_alignment_puts_the_eyes_on_the_template() {
    let r: Vec<RefImage> = serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
    let img = preprocess::load_rgb(&dir().join("obama2.jpg")).unwrap();
    let f = &detector().detect(&img)[0];
    let crop = align::align_landmarks(&img, f, 160).unwrap();
    assert_eq!(crop.dimensions(), (160, 160));
    // the aligned crop of the same face, detected again, has its eyes near the template's
    let again = detector().detect(&crop);
    assert!(!again.is_empty() && r.len() > 1);
    let le = again[0].landmarks[0];
    let k = 160.0 / 112.0;
    assert!((le[0] - 38.29 * k).abs() < 6.0 && (le[1] - 51.70 * k).abs() < 6.0, "left eye at {le:?}");
}

// ---------------------------------------------------------------------------------------------
// The commands

/// Random face weights: a narrow IR-v1 with facenet's 160 px preprocessing.
fn face_weights() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = common::unique_temp_dir("faces-w");
        std::fs::create_dir_all(&d).unwrap();
        let cfg = ModelConfig { width: 0.25, ..ModelConfig::new(ModelKind::InceptionResnetV1, 0) };
        let m = Model::new(&cfg, &Device::flex());
        let p = d.join("irv1.safetensors");
        weights::save_model(&m, &p, &inception::Preprocess::facenet(), &[]).unwrap();
        p
    })
}

fn photo(name: &str) -> PathBuf {
    dir().join(format!("{name}.jpg"))
}

#[test]
fn detect_json_draw_and_bad_files() {
    let out = common::unique_temp_dir("faces-detect");
    std::fs::create_dir_all(&out).unwrap();
    let bad = out.join("broken.jpg");
    let bytes = std::fs::read(photo("obama")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap(); // truncated
    let draw = out.join("drawn");
    let o = run(&[
        "faces",
        "detect",
        "--json",
        "--draw",
        s(&draw),
        s(&photo("group")),
        s(&photo("no_face_chelsea")),
        s(&bad),
    ]);
    assert_eq!(o.status.code(), Some(1), "a bad file among good ones: exit 1\n{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let faces = v[0]["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 3);
    assert_eq!(faces[0]["box"].as_array().unwrap().len(), 4);
    assert_eq!(faces[0]["landmarks"].as_array().unwrap().len(), 5);
    assert!(faces[0]["prob"].as_f64().unwrap() > 0.9);
    assert_eq!(v[1]["faces"].as_array().unwrap().len(), 0);
    assert!(v[2]["error"].as_str().unwrap().contains("truncated"), "{}", v[2]);
    let drawn = image::open(draw.join("group.png")).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (720, 400));
    // one face per image on request
    let o = run(&["faces", "detect", "--json", "--select", "probability", s(&photo("group"))]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["faces"].as_array().unwrap().len(), 1);
    // out-of-range flags are usage errors
    let obama = photo("obama");
    for args in [
        &["--min-face-size", "3"][..],
        &["--thresholds", "0.6,0.7"],
        &["--factor", "1.5"],
        &["--thresholds", "nan,1,1"],
    ] {
        let mut a = vec!["faces", "detect"];
        a.extend_from_slice(args);
        a.push(s(&obama));
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
}

#[test]
fn embed_verify_and_eval_pairs_with_random_weights() {
    let w = face_weights();
    let out = common::unique_temp_dir("faces-embed");
    std::fs::create_dir_all(&out).unwrap();
    // embed: every face of every image, with provenance
    let e = out.join("e.safetensors");
    let o = run(&["faces", "embed", "--weights", s(w), "--out", s(&e), s(&photo("group")), s(&photo("biden"))]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&e).unwrap();
    let t = weights::tensor_f32(&e, &weights::parse(&e, &bytes).unwrap(), "embeddings").unwrap();
    assert_eq!(t.shape, vec![4, 128], "3 + 1 faces; 512-d at width 1, 128 at 0.25");
    for row in t.data.chunks(128) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "embeddings are unit vectors ({n})");
    }
    let meta = weights::read_metadata_entry(&e, "faces").unwrap().unwrap();
    let rows: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(rows[2]["face"], 2);
    assert!(rows[3]["image"].as_str().unwrap().ends_with("biden.jpg"));
    // verify: a photo against itself is the same person at distance 0
    let o = run(&["faces", "verify", "--weights", s(w), "--json", s(&photo("obama")), s(&photo("obama"))]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["distance"].as_f64().unwrap() < 1e-4 && v["same"] == true, "{v}");
    let o =
        run(&["faces", "verify", "--weights", s(w), "--align", "landmarks", s(&photo("obama")), s(&photo("biden"))]);
    assert!(o.status.success() && text(&o).contains("distance"), "{}", text(&o));
    // a photo without a face: a clear error
    let o = run(&["faces", "verify", "--weights", s(w), s(&photo("obama")), s(&photo("no_face_chelsea"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no face found"), "{}", text(&o));

    // eval-pairs on an LFW-style tree built from the photos
    let root = out.join("lfw");
    let people = [
        ("Barack_Obama", &["obama", "obama2", "obama3", "obama_partial_face"][..]),
        ("Joe_Biden", &["biden"]),
        ("Grace_Hopper", &["grace_hopper"]),
        ("Eileen_Collins", &["astronaut"]),
    ];
    for (name, files) in people {
        std::fs::create_dir_all(root.join(name)).unwrap();
        for (i, f) in files.iter().enumerate() {
            std::fs::copy(photo(f), root.join(name).join(format!("{name}_{:04}.jpg", i + 1))).unwrap();
        }
    }
    let pairs = out.join("pairs.txt");
    std::fs::write(
        &pairs,
        "2\t6\nBarack_Obama\t1\t2\nBarack_Obama\t1\t3\nBarack_Obama\t2\t4\nBarack_Obama\t3\t4\nBarack_Obama\t2\t3\nBarack_Obama\t1\t4\n\
         Barack_Obama\t1\tJoe_Biden\t1\nBarack_Obama\t2\tGrace_Hopper\t1\nJoe_Biden\t1\tEileen_Collins\t1\n\
         Grace_Hopper\t1\tEileen_Collins\t1\nBarack_Obama\t3\tEileen_Collins\t1\nBarack_Obama\t4\tJoe_Biden\t1\n",
    )
    .unwrap();
    let res = out.join("res");
    let o = run(&[
        "faces",
        "eval-pairs",
        "--weights",
        s(w),
        "--pairs",
        s(&pairs),
        "--root",
        s(&root),
        "--out",
        s(&res),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["pairs"], 12);
    assert_eq!(r["same"], 6);
    assert_eq!(r["folds"], 10);
    let acc = r["accuracy_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let csv = std::fs::read_to_string(res.join("roc.csv")).unwrap();
    assert!(csv.starts_with("threshold,tpr,fpr") && csv.lines().count() > 100);
    assert!(image::open(res.join("roc.png")).is_ok());
    assert!(res.join("report.json").exists());
}

#[test]
fn embed_without_weights_or_with_bad_pairs_is_a_clear_error() {
    let o = run(&["faces", "embed", "--out", "/tmp/never.safetensors", s(&photo("obama"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("convert_facenet.py"), "{}", text(&o));
    // weights of another network: named as such
    let cfg = ModelConfig { width: 0.1, ..ModelConfig::new(ModelKind::InceptionResnetV2, 0) };
    let d = common::unique_temp_dir("faces-pairs");
    std::fs::create_dir_all(&d).unwrap();
    let v2 = d.join("v2.safetensors");
    weights::save_model(&Model::new(&cfg, &Device::flex()), &v2, &inception::Preprocess::facenet(), &[]).unwrap();
    let o = run(&["faces", "embed", "--weights", s(&v2), "--out", "/tmp/never.safetensors", s(&photo("obama"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("holds inception_resnet_v2 weights"), "{}", text(&o));
    let p = d.join("pairs.txt");
    std::fs::write(&p, "a.jpg b.jpg 1\nc.jpg d.jpg 1\n").unwrap();
    let o = run(&["faces", "eval-pairs", "--weights", s(face_weights()), "--pairs", s(&p), "--root", s(&d)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("both kinds"), "{}", text(&o));
    std::fs::write(&p, "a.jpg b.jpg maybe\n").unwrap();
    let o = run(&["faces", "eval-pairs", "--weights", s(face_weights()), "--pairs", s(&p), "--root", s(&d)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("pairs.txt:1"), "{}", text(&o));
}

#[test]
fn the_protocol_on_known_distances() {
    // perfectly separable: accuracy 1 on every fold, AUC 1
    let d: Vec<f32> = (0..40).map(|i| if i % 2 == 0 { 0.4 } else { 1.4 }).collect();
    let same: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
    let out = common::unique_temp_dir("faces-proto");
    let r = faces::pairs::evaluate(&d, &same, &out).unwrap();
    assert_eq!(r.folds, 10);
    assert!((r.accuracy_mean - 1.0).abs() < 1e-12 && r.accuracy_std == 0.0);
    assert!((r.auc - 1.0).abs() < 1e-9, "auc {}", r.auc);
    assert!(r.thresholds.iter().all(|t| *t > 0.4 && *t <= 1.4));
    assert!((r.val_mean - 1.0).abs() < 1e-12 && r.far_mean == 0.0);
    // non-finite distances are refused
    assert!(faces::pairs::evaluate(&[f32::NAN, 1.0], &[true, false], &out).is_err());
}
