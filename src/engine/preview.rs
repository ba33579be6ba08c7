//! A cheap preview of latents while sampling: each of the 16 latent channels contributes
//! linearly to R, G and B. The factors are the FLUX.1 ones ComfyUI's latent previewer uses
//! (`comfy/latent_formats.py`, class `Flux`), fitted to map the model's (scaled, shifted)
//! latents to RGB in [-1, 1]. The result is 1/8 of the image size; a browser scales it up.

/// `FACTORS[c] = [r, g, b]`: the contribution of latent channel `c`.
const FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// Latents [channels, h, w] (channel-major) → an RGB image of h × w. Models with other than
/// 16 latent channels (tiny test models) use the first channels, cycling through the factors.
pub fn latents_to_rgb(latents: &[f32], channels: usize, h: usize, w: usize) -> image::RgbImage {
    let plane = h * w;
    image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        let mut rgb = BIAS;
        for c in 0..channels {
            let v = latents[c * plane + i];
            for (k, out) in rgb.iter_mut().enumerate() {
                *out += v * FACTORS[c % 16][k];
            }
        }
        image::Rgb(rgb.map(|v| ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_latents_give_the_bias_colour() {
        let img = super::latents_to_rgb(&[0.0; 16 * 2 * 3], 16, 2, 3);
        assert_eq!((img.width(), img.height()), (3, 2));
        // (-0.0329 + 1) / 2 * 255 = 123.3
        assert_eq!(img.get_pixel(0, 0).0, [123, 118, 117]);
    }

    #[test]
    fn one_channel_moves_the_colour_by_its_factors() {
        let mut l = vec![0.0; 16];
        l[12] = 1.0; // channel 12 lightens all three
        let img = super::latents_to_rgb(&l, 16, 1, 1);
        let base = super::latents_to_rgb(&[0.0; 16], 16, 1, 1);
        for k in 0..3 {
            assert!(img.get_pixel(0, 0).0[k] > base.get_pixel(0, 0).0[k]);
        }
    }
}
