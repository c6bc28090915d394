//! Every block type against the reference (timm / facenet-pytorch), with the deterministic
//! weights of scripts/reference/make_blocks.py, on a 5x5 input. Tolerance 1e-4.

mod common;

use burn::tensor::{Device, Tensor};
use inception::models::inception_resnet::{IrConfig, ReductionB, ResBlock, ResKind, mixed_5b};
use inception::models::inception_v4 as v4;

const ATOL: f32 = 1e-4;

fn check(name: &str, forward: impl Fn(Tensor<4>) -> Tensor<4>) {
    let device = Device::flex();
    let path = common::fixtures().join("blocks.safetensors");
    let x = common::read_tensor::<4>(&path, &format!("{name}.input"), &device);
    let expected = common::read_tensor::<4>(&path, &format!("{name}.output"), &device);
    let diff = common::max_abs_diff(forward(x), expected);
    assert!(diff <= ATOL, "{name}: max abs diff {diff:e} > {ATOL:e}");
}

macro_rules! block_test {
    ($test:ident, $name:literal, $make:expr) => {
        #[test]
        fn $test() {
            let device = Device::flex();
            let block = common::deterministic($make(&device));
            check($name, |x| block.forward(x));
        }
    };
}

block_test!(v4_mixed3a, "v4.mixed3a", |d| v4::Mixed3a::new(1.0, d));
block_test!(v4_mixed4a, "v4.mixed4a", |d| v4::Mixed4a::new(1.0, d));
block_test!(v4_mixed5a, "v4.mixed5a", |d| v4::Mixed5a::new(1.0, d));
block_test!(v4_inception_a, "v4.inception_a", |d| v4::inception_a(384, 1.0, d));
block_test!(v4_reduction_a, "v4.reduction_a", |d| v4::ReductionA::new(384, [192, 224, 256, 384], d));
block_test!(v4_inception_b, "v4.inception_b", |d| v4::inception_b(1024, 1.0, d));
block_test!(v4_reduction_b, "v4.reduction_b", |d| v4::ReductionB::new(1024, 1.0, d));
block_test!(v4_inception_c, "v4.inception_c", |d| v4::InceptionC::new(1536, 1.0, d));

fn v2() -> IrConfig {
    IrConfig::slim_v2(0)
}
fn v1() -> IrConfig {
    IrConfig::facenet_v1(0)
}

block_test!(v2_mixed_5b, "v2.mixed_5b", |d| mixed_5b(1.0, d));
block_test!(v2_block35, "v2.block35", |d| ResBlock::new(ResKind::A, &v2().block_a, 0.17, true, d));
block_test!(v2_mixed_6a, "v2.mixed_6a", |d| v4::ReductionA::new(320, v2().reduction_a, d));
block_test!(v2_block17, "v2.block17", |d| ResBlock::new(ResKind::B, &v2().block_b, 0.10, true, d));
block_test!(v2_mixed_7a, "v2.mixed_7a", |d| ReductionB::new(1088, &v2().reduction_b, d));
block_test!(v2_block8, "v2.block8", |d| ResBlock::new(ResKind::C, &v2().block_c, 0.20, true, d));
block_test!(v2_block8_last, "v2.block8_last", |d| ResBlock::new(ResKind::C, &v2().block_c, 1.0, false, d));
block_test!(v1_block35, "v1.block35", |d| ResBlock::new(ResKind::A, &v1().block_a, 0.17, true, d));
block_test!(v1_mixed_6a, "v1.mixed_6a", |d| v4::ReductionA::new(256, v1().reduction_a, d));
block_test!(v1_block17, "v1.block17", |d| ResBlock::new(ResKind::B, &v1().block_b, 0.10, true, d));
block_test!(v1_mixed_7a, "v1.mixed_7a", |d| ReductionB::new(896, &v1().reduction_b, d));
block_test!(v1_block8, "v1.block8", |d| ResBlock::new(ResKind::C, &v1().block_c, 0.20, true, d));
block_test!(v1_block8_last, "v1.block8_last", |d| ResBlock::new(ResKind::C, &v1().block_c, 1.0, false, d));
