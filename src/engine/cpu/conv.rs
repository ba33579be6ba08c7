//! 3×3 convolutions with stride 1 and padding 1 (nearly every convolution of the VAE) as nine
//! accumulated matrix products over a padded copy of the input, one per kernel tap, with no
//! im2col buffer: computing each output row over the padded width makes every tap's input a
//! plain [C_in, rows·(W+2)] matrix at an offset, and the two extra columns per row are dropped
//! when the band is copied out. burn's CPU path converts to NHWC and builds im2col tiles.

use burn::tensor::{Shape, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::SharedMut;

/// Output elements per band (over all output channels): bounds the scratch to 32 MiB.
const BAND_ELEMENTS: usize = 8 << 20;

/// `x` [B, C_in, H, W] ⋆ `weight` [C_out, C_in, 3, 3] + `bias`, stride 1, zero padding 1.
pub fn conv3x3(x: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> Option<Tensor<4>> {
    let x = super::contiguous(super::flex_f32(x)?);
    let w = super::contiguous(super::flex_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(super::contiguous(super::flex_f32(b)?)),
        None => None,
    };
    let [batch, cin, h, wd] = super::dims4(&x);
    let [cout, wcin, kh, kw] = super::dims4(&w);
    if wcin != cin
        || kh != 3
        || kw != 3
        || h == 0
        || wd == 0
        || bias.as_ref().is_some_and(|b| b.layout().num_elements() != cout)
    {
        return None;
    }
    let pw = wd + 2;
    let plane = (h + 2) * pw;
    // Two spare elements: the last taps of the last (dropped) column read past the plane.
    let mut padded = vec![0f32; cin * plane + 2];
    let band_rows = (BAND_ELEMENTS / (cout * pw)).clamp(1, h);
    let mut wide = vec![0f32; cout * band_rows * pw];
    let mut out = FlexTensor::empty(Shape::new([batch, cout, h, wd]), x.dtype());
    let dst = SharedMut(out.storage_mut::<f32>().as_mut_ptr());
    let (src, weights): (&[f32], &[f32]) = (x.storage(), w.storage());
    let bias: Option<&[f32]> = bias.as_ref().map(|b| b.storage());
    for b in 0..batch {
        let image = &src[b * cin * h * wd..][..cin * h * wd];
        padded[..cin * plane].par_chunks_mut(plane).zip(image.par_chunks(h * wd)).for_each(|(p, c)| {
            for (y, row) in c.chunks(wd).enumerate() {
                p[(y + 1) * pw + 1..][..wd].copy_from_slice(row);
            }
        });
        for y0 in (0..h).step_by(band_rows) {
            let rows = band_rows.min(h - y0);
            let n = rows * pw;
            let wide = &mut wide[..cout * n];
            wide.par_chunks_mut(n).enumerate().for_each(|(co, r)| r.fill(bias.map_or(0.0, |b| b[co])));
            for tap in 0..9 {
                let (ky, kx) = (tap / 3, tap % 3);
                // SAFETY: lhs reads weight[co, ci, ky, kx] (co < C_out, ci < C_in); rhs reads
                // padded[ci·plane + (y0 + ky)·pw + kx + j] for j < rows·pw, which ends at most
                // 2 elements past the last plane (the spare ones); dst is `wide`'s own band.
                unsafe {
                    gemm::gemm(
                        cout,
                        n,
                        cin,
                        wide.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        weights.as_ptr().add(tap),
                        9,
                        (cin * 9) as isize,
                        padded.as_ptr().add((y0 + ky) * pw + kx),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    );
                }
            }
            let wide = &*wide;
            (0..cout).into_par_iter().for_each(|co| {
                for r in 0..rows {
                    let at = ((b * cout + co) * h + y0 + r) * wd;
                    // SAFETY: (b, co, y0 + r) is one output row, written by this task alone.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.at(at), wd) };
                    row.copy_from_slice(&wide[co * n + r * pw..][..wd]);
                }
            });
        }
    }
    Some(super::into_tensor(out))
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;

    use super::super::test_util::{max_diff, random};

    #[test]
    fn matches_burns_conv2d_with_bias_and_batches() {
        let (x, w, b) = (random([2, 5, 7, 9]), random([4, 5, 3, 3]), random([4]));
        let options = ConvOptions { stride: [1; 2], padding: [(1, 1); 2], dilation: [1; 2], groups: 1 };
        let want = conv2d(x.clone(), w.clone(), Some(b.clone()), options);
        assert!(max_diff(super::conv3x3(&x, &w, Some(&b)).unwrap(), want) < 1e-4);
    }

    #[test]
    fn bands_cover_a_tall_image() {
        // 300 output channels × 2050 columns: bands of 13 rows, the last one ragged.
        let (x, w) = (random([1, 2, 40, 2048]), random([300, 2, 3, 3]));
        let options = ConvOptions { stride: [1; 2], padding: [(1, 1); 2], dilation: [1; 2], groups: 1 };
        let want = conv2d(x.clone(), w.clone(), None, options);
        assert!(max_diff(super::conv3x3(&x, &w, None).unwrap(), want) < 1e-4);
    }
}
