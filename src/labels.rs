//! Class names: ImageNet-1k (timm's synset order and lemmas), embedded in the binary.

const IMAGENET: &str = include_str!("../assets/imagenet_labels.txt");

/// The 1000 ImageNet class names (first lemma of each synset), in the published weights' order.
pub fn imagenet() -> Vec<String> {
    IMAGENET
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap_or(l).split(',').next().unwrap_or("").trim().to_string())
        .collect()
}
