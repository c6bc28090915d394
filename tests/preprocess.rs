//! Preprocessing against timm's eval transform on real photos (fixtures from
//! scripts/reference/make_preprocess.py): exact on lossless files and on JPEGs, CMYK included
//! (decoded by libjpeg-turbo's decoder and converted as Pillow does); eval and classify share
//! the one function.

use std::path::{Path, PathBuf};

use inception::ModelKind;
use inception::preprocess::{self, Preprocess};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn configs() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference/configs.json")).unwrap()).unwrap()
}

/// `(max, mean)` absolute difference in 8-bit steps.
fn diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    (*d.iter().max().unwrap(), d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64)
}

#[test]
fn registry_configs_equal_timms() {
    let c = configs();
    for kind in [ModelKind::InceptionV4, ModelKind::InceptionResnetV2] {
        let want = &c["configs"][kind.name()];
        let pre = kind.pretrained().pre;
        assert_eq!(want["input_size"][1].as_u64(), Some(pre.input_size as u64));
        assert_eq!(want["crop_pct"].as_f64(), Some(pre.crop_pct));
        assert_eq!(want["interpolation"].as_str(), Some("bicubic"));
        assert_eq!(want["mean"][0].as_f64(), Some(pre.mean[0] as f64));
        assert_eq!(want["std"][0].as_f64(), Some(pre.std[0] as f64));
    }
}

#[test]
fn matches_timm_on_real_photos() {
    let c = configs();
    let photos = c["photos"].as_object().unwrap();
    let mut report = Vec::new();
    for kind in [ModelKind::InceptionV4, ModelKind::InceptionResnetV2] {
        let pre = kind.pretrained().pre;
        for (photo, how) in photos {
            let reference =
                image::open(fixtures().join(format!("reference/{photo}.{}.png", kind.name()))).unwrap().to_rgb8();
            let img = preprocess::load_rgb(&fixtures().join(photo)).unwrap();
            let ours = pre.view(&img);
            let (max, mean) = diff(&ours, &reference);
            report.push(format!("{photo} {}: max {max} mean {mean:.4} LSB", kind.name()));
            match how.as_str() {
                Some("lossless") => assert!(max <= 1, "{photo} {}: max {max} LSB", kind.name()),
                _ => assert_eq!(max, 0, "{photo} {}: JPEG differs from Pillow's decode by {max} LSB", kind.name()),
            }
            // the tensor is the crop, normalised
            assert_eq!(pre.apply(&img), preprocess::to_tensor(&ours, pre.mean, pre.std));
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn eval_and_classify_share_the_transform() {
    // `eval` (train::evaluate) turns each image into multi_crops(.., 1), classify into
    // Preprocess::load: both are Preprocess::apply
    let pre = ModelKind::InceptionResnetV2.pretrained().pre;
    let path = fixtures().join("landscape_chelsea.png");
    let img = preprocess::load_rgb(&path).unwrap();
    let eval_view = inception::train::data::multi_crops(&img, &pre, 1);
    assert_eq!(eval_view, vec![pre.load(&path).unwrap()]);
    let t = inception::train::data::Transform::Eval(pre.clone());
    assert_eq!(t.apply(&img, &mut inception::train::data::SplitMix::new(1)), pre.apply(&img));
}

#[test]
fn geometry_follows_torchvision() {
    // Resize(333) of 451 x 300: long side int(333 * 451 / 300) = 500
    assert_eq!(preprocess::resize_shorter(451, 300, 333), (500, 333));
    assert_eq!(preprocess::resize_shorter(300, 451, 341), (341, 512));
    // CenterCrop offsets round half to even: (342 - 299) / 2 = 21.5 -> 22, (340 - 299) / 2 = 20.5 -> 20
    assert_eq!(preprocess::center_crop_origin(342, 340, 299, 299), (22, 20));
    // smaller than the crop: zero padding of (299 - 200) // 2 = 49 on the left
    assert_eq!(preprocess::center_crop_origin(200, 299, 299, 299), (-49, 0));
    assert_eq!(preprocess::scale_size(299, 0.8975), 333);
    assert_eq!(preprocess::scale_size(299, 0.875), 341);
}

#[test]
fn identity_resize_and_padding() {
    let img = image::RgbImage::from_fn(90, 80, |x, y| image::Rgb([x as u8, y as u8, (x * y) as u8]));
    for f in [preprocess::Interpolation::Bicubic, preprocess::Interpolation::Bilinear] {
        assert_eq!(preprocess::resize(&img, 90, 80, f), img);
        let w = preprocess::resize_window(&img, 90, 80, -5, -5, 100, 90, f);
        assert_eq!(w.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(w.get_pixel(5 + 7, 5 + 3), img.get_pixel(7, 3));
    }
}

#[test]
fn crop_pct_one_on_a_square_input_is_the_input() {
    let pre = Preprocess { input_size: 75, crop_pct: 1.0, ..Preprocess::inception(75, 1.0) };
    let img = image::RgbImage::from_fn(75, 75, |x, y| image::Rgb([x as u8, y as u8, 7]));
    assert_eq!(pre.view(&img), img);
}
