//! Dev tool: top-1 of two models on a dataset's evaluation split, and how often their top-1
//! predictions agree (e.g. an int8 file against the f32 model it was quantized from).
//!
//!     cargo run --release --example agreement -- F32.safetensors INT8.safetensors fashion-mnist
use burn::tensor::Device;
use inception::Bundle;
use inception::predict::EngineKind;
use inception::train::data::Dataset;

fn main() -> inception::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b, data] = &args[..] else {
        eprintln!("usage: agreement A.safetensors B.safetensors DATA");
        std::process::exit(2);
    };
    let dev = Device::flex();
    let (ba, bb) = (Bundle::load(None, Some(a.as_ref()), &dev)?, Bundle::load(None, Some(b.as_ref()), &dev)?);
    let (pa, pb) = (ba.predictor(EngineKind::Fast, &dev)?, bb.predictor(EngineKind::Fast, &dev)?);
    let ds = Dataset::open(data, false)?;
    let s = ba.pre.input_size;
    let argmax = |row: &[f32]| row.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map_or(0, |(i, _)| i);
    let (mut hit_a, mut hit_b, mut agree, mut n) = (0, 0, 0, 0);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(64) {
        let imgs: Vec<_> = chunk.iter().filter_map(|&i| ds.image(i).ok().map(|im| (i, im))).collect();
        let xa: Vec<f32> = imgs.iter().flat_map(|(_, im)| ba.pre.apply(im)).collect();
        let xb: Vec<f32> = imgs.iter().flat_map(|(_, im)| bb.pre.apply(im)).collect();
        let shape = [imgs.len(), 3, s, s];
        let (la, lb) = (pa.run(&xa, shape, false).logits, pb.run(&xb, shape, false).logits);
        let c = la.shape[1];
        for (j, (i, _)) in imgs.iter().enumerate() {
            let (ya, yb) = (argmax(&la.data[j * c..][..c]), argmax(&lb.data[j * c..][..c]));
            hit_a += (ya == ds.labels[*i]) as usize;
            hit_b += (yb == ds.labels[*i]) as usize;
            agree += (ya == yb) as usize;
            n += 1;
        }
    }
    let pct = |v: usize| 100.0 * v as f64 / n.max(1) as f64;
    println!("{n} images: top-1 {a} {:.2}%, {b} {:.2}%, top-1 agreement {:.2}%", pct(hit_a), pct(hit_b), pct(agree));
    Ok(())
}
