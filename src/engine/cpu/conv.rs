//! 3×3 convolutions with stride 1 and padding 1 (nearly every convolution of the VAE) by
//! Winograd's F(2×2, 3×3): each 2×2 block of outputs takes 16 products per input channel instead
//! of 36, as 16 matrix products [C_out, C_in] × [C_in, tiles] between transformed weights and
//! transformed 4×4 input patches (Lavin & Gray 2015). Its rounding error is a few ulp of the
//! sums, well inside the VAE's tolerance. burn's CPU path converts to NHWC, builds im2col
//! tiles and does the full 36.

use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use super::math::simd_dispatch;
use super::{SharedMut, Strided, matmul};

/// Transformed inputs (and products) per band, in elements of the larger of the two: 16 MiB.
const BAND_ELEMENTS: usize = 4 << 20;

/// What [`conv3x3_with`] applies to its input as it reads it, so that the transformed input is
/// never materialised whole (the VAE's largest activations are exactly those copies).
#[derive(Debug, Clone, Default)]
pub struct ConvInput {
    /// Per (image, input channel) y = x·a + k: a GroupNorm (`group_affine`).
    pub affine: Option<Vec<(f32, f32)>>,
    /// SiLU (after the affine map, if any).
    pub silu: bool,
    /// Nearest-neighbour ×2 first: the convolution runs on the doubled image.
    pub upsample: bool,
}

/// `x` [B, C_in, H, W] ⋆ `weight` [C_out, C_in, 3, 3] + `bias`, stride 1, zero padding 1.
/// `bf16`: the 16 products on AMX tiles, their operands rounded to bf16 (`--dtype bf16` on a
/// CPU with AMX), where C_in and the tiles per row are multiples of 32.
pub fn conv3x3(x: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>, bf16: bool) -> Option<Tensor<4>> {
    conv3x3_with(x, weight, bias, bf16, &ConvInput::default())
}

/// [`conv3x3`] of `input` applied to `x` (normalised, activated, doubled), with the same
/// values as materialising that input first. The zero-padded input is built band by band
/// (the tile rows one pass of products covers), never whole.
pub fn conv3x3_with(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    bf16: bool,
    input: &ConvInput,
) -> Option<Tensor<4>> {
    let x = super::contiguous(super::flex_f32(x)?);
    let w = super::contiguous(super::flex_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(super::contiguous(super::flex_f32(b)?)),
        None => None,
    };
    let [batch, cin, h_in, wd_in] = super::dims4(&x);
    let scale = if input.upsample { 2 } else { 1 };
    let (h, wd) = (scale * h_in, scale * wd_in);
    let [cout, wcin, kh, kw] = super::dims4(&w);
    if input.affine.as_ref().is_some_and(|a| a.len() != batch * cin) {
        return None;
    }
    if wcin != cin
        || kh != 3
        || kw != 3
        || h == 0
        || cout == 0
        || cin == 0
        || wd == 0
        || bias.as_ref().is_some_and(|b| b.layout().num_elements() != cout)
    {
        return None;
    }
    let u = transform_weights(w.storage(), cout, cin);
    // Tiles of 2×2 outputs; the padded input covers every tile's 4×4 patch. Its even and odd
    // columns are kept apart ([C_in][row][even | odd], tw + 1 each), so that the patches of a
    // row of tiles are contiguous slices (column 2·tx + c is half[c % 2][tx + c / 2]).
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let half = tw + 1;
    let prow = 2 * half;
    let band_rows = (BAND_ELEMENTS / (16 * cin.max(cout) * tw)).clamp(1, th);
    // The padded rows of one band: 2·rows + 2 per channel. Columns outside the image are never
    // written, so they stay zero from here on.
    let plane = (2 * band_rows + 2) * prow;
    let mut padded = vec![0f32; cin * plane];
    let mut v = vec![0f32; 16 * cin * band_rows * tw];
    let mut m = vec![0f32; 16 * cout * band_rows * tw];
    #[cfg(target_arch = "x86_64")]
    let tiles = bf16 && super::amx::available() && cin.is_multiple_of(32) && tw.is_multiple_of(32);
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = {
        let _ = bf16;
        false
    };
    #[cfg(target_arch = "x86_64")]
    let mut v_tiles = if tiles { vec![0u16; v.len()] } else { Vec::new() };
    let mut out = super::zeros(Shape::new([batch, cout, h, wd]));
    let dst = SharedMut(out.storage_mut::<f32>().as_mut_ptr());
    let src: &[f32] = x.storage();
    let bias: Option<&[f32]> = bias.as_ref().map(|b| b.storage());
    for b in 0..batch {
        let image = &src[b * cin * h_in * wd_in..][..cin * h_in * wd_in];
        let affine = input.affine.as_ref().map(|a| &a[b * cin..][..cin]);
        for r0 in (0..th).step_by(band_rows) {
            let rows = band_rows.min(th - r0);
            let nt = rows * tw;
            let (v, m) = (&mut v[..16 * cin * nt], &mut m[..16 * cout * nt]);
            let fill = |(ci, (p, c)): (usize, (&mut [f32], &[f32]))| {
                let map = affine.map(|a| a[ci]).or(input.silu.then_some((1.0, 0.0)));
                let mut mapped = vec![0f32; if map.is_some() { wd_in } else { 0 }];
                // Band row l is padded row 2·r0 + l, image row 2·r0 + l − 1.
                for (l, padded_row) in p.chunks_mut(prow).take(2 * rows + 2).enumerate() {
                    let (even, odd) = padded_row.split_at_mut(half);
                    let y = (2 * r0 + l).checked_sub(1).filter(|&y| y < h);
                    let Some(y) = y else {
                        even.fill(0.0);
                        odd.fill(0.0);
                        continue;
                    };
                    let mut row = &c[y / scale * wd_in..][..wd_in];
                    if let Some((a, k)) = map {
                        super::norm::affine_silu(row, &mut mapped, a, k, input.silu);
                        row = &mapped;
                    }
                    // Padded column x + 1: odd for even x.
                    for x in 0..wd {
                        let value = row[x / scale];
                        if x % 2 == 0 { odd[x / 2] = value } else { even[x.div_ceil(2)] = value }
                    }
                }
            };
            padded.par_chunks_mut(plane).zip(image.par_chunks(h_in * wd_in)).enumerate().for_each(fill);
            transform_inputs(&padded, plane, half, 0, rows, tw, cin, v);
            let v = &*v;
            if tiles {
                #[cfg(target_arch = "x86_64")]
                {
                    let v_tiles = &mut v_tiles[..16 * cin * nt];
                    v_tiles.par_chunks_mut(cin * nt).zip(v.par_chunks(cin * nt)).for_each(|(t, v)| {
                        super::amx::tiles_from_rows(v, (cin, nt), t);
                    });
                    let v_tiles = &*v_tiles;
                    m.par_chunks_mut(cout * nt).enumerate().for_each(|(xi, m)| {
                        let (u, vt) = (&u[xi * cout * cin..][..cout * cin], &v_tiles[xi * cin * nt..][..cin * nt]);
                        // SAFETY: M_ξ is this task's contiguous [C_out, tiles] block.
                        unsafe { super::amx::product_rows(u, (cout, cin, cin), vt, nt, (m.as_mut_ptr(), nt)) };
                    });
                }
            } else {
                // M_ξ [C_out, tiles] = U_ξ [C_out, C_in] · V_ξ [C_in, tiles], the 16 in parallel.
                m.par_chunks_mut(cout * nt).enumerate().for_each(|(xi, m)| {
                    // SAFETY: U_ξ, V_ξ and M_ξ are contiguous row-major blocks of the given sizes.
                    unsafe {
                        matmul(
                            cout,
                            nt,
                            cin,
                            Strided { ptr: m.as_mut_ptr(), row: nt as isize, col: 1 },
                            false,
                            Strided { ptr: u[xi * cout * cin..].as_ptr(), row: cin as isize, col: 1 },
                            Strided { ptr: v[xi * cin * nt..].as_ptr(), row: nt as isize, col: 1 },
                            1.0,
                            false,
                        );
                    }
                });
            }
            let m = &*m;
            (0..cout).into_par_iter().for_each_init(
                || vec![0f32; 4 * tw],
                |pair_rows, co| {
                    let bias = bias.map_or(0.0, |b| b[co]);
                    for r in 0..rows {
                        let ms: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * cout + co) * nt + r * tw..][..tw]);
                        let (top, bottom) = pair_rows.split_at_mut(2 * tw);
                        transform_outputs(ms, bias, top, bottom);
                        for (dy, values) in [&*top, &*bottom].into_iter().enumerate() {
                            let y = 2 * (r0 + r) + dy;
                            if y < h {
                                // SAFETY: output channel `co` is written by this task alone, and
                                // the row (b, co, y) lies inside the output.
                                let out = unsafe {
                                    std::slice::from_raw_parts_mut(dst.at(((b * cout + co) * h + y) * wd), wd)
                                };
                                out.copy_from_slice(&values[..wd]);
                            }
                        }
                    }
                },
            );
        }
    }
    Some(super::into_tensor(out))
}

/// U_ξ [16][C_out][C_in] = G g Gᵀ per 3×3 kernel g, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    let shared = SharedMut(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..][..9];
            // G g: 4 rows of 3.
            let mut t = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[0][c] = g0;
                t[1][c] = 0.5 * (g0 + g1 + g2);
                t[2][c] = 0.5 * (g0 - g1 + g2);
                t[3][c] = g2;
            }
            for (r, t) in t.iter().enumerate() {
                let row = [t[0], 0.5 * (t[0] + t[1] + t[2]), 0.5 * (t[0] - t[1] + t[2]), t[2]];
                for (c, value) in row.into_iter().enumerate() {
                    // SAFETY: (ξ, co, ci) is written once, by the task of `co`.
                    unsafe { *shared.at(((4 * r + c) * cout + co) * cin + ci) = value };
                }
            }
        }
    });
    u
}

/// V_ξ [16][C_in][tiles] = Bᵀ d B for the 4×4 patch d of every tile in tile rows
/// r0..r0 + rows, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
#[allow(clippy::too_many_arguments)]
fn transform_inputs(
    padded: &[f32],
    plane: usize,
    half: usize,
    r0: usize,
    rows: usize,
    tw: usize,
    cin: usize,
    v: &mut [f32],
) {
    let nt = rows * tw;
    let shared = SharedMut(v.as_mut_ptr());
    (0..cin).into_par_iter().for_each(|ci| {
        let p = &padded[ci * plane..][..plane];
        for r in 0..rows {
            let ty = r0 + r;
            let row = |pr: usize| p[(2 * ty + pr) * 2 * half..][..2 * half].split_at(half);
            let (rows4, t0) = ([row(0), row(1), row(2), row(3)], r * tw);
            let even: [&[f32]; 4] = std::array::from_fn(|i| rows4[i].0);
            let odd: [&[f32]; 4] = std::array::from_fn(|i| rows4[i].1);
            // SAFETY: (ξ, ci, t0..t0 + tw) are written by the task of `ci` alone.
            let outs: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                std::slice::from_raw_parts_mut(shared.at((xi * cin + ci) * nt + t0), tw)
            });
            input_row(even, odd, outs);
        }
    });
}

/// One row of tiles: `even`/`odd` are the half-rows of the patches' 4 padded rows, `outs` the
/// 16 transformed planes' slices for these tiles.
fn input_row(even: [&[f32]; 4], odd: [&[f32]; 4], outs: [&mut [f32]; 16]) {
    let tw = outs[0].len();
    // Patch columns 0..4 of every tile: even[tx], odd[tx], even[tx + 1], odd[tx + 1].
    let cols = |r: usize| [&even[r][..tw], &odd[r][..tw], &even[r][1..tw + 1], &odd[r][1..tw + 1]];
    let [o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15] = outs;
    // Bᵀ's rows: d0 − d2, d1 + d2, d2 − d1, d1 − d3; then the same along the columns.
    input_quad(cols(0), cols(2), -1.0, [o0, o1, o2, o3]);
    input_quad(cols(1), cols(2), 1.0, [o4, o5, o6, o7]);
    input_quad(cols(2), cols(1), -1.0, [o8, o9, o10, o11]);
    input_quad(cols(1), cols(3), -1.0, [o12, o13, o14, o15]);
}

simd_dispatch! {
    /// s = p + k·q per patch column, then (s0 − s2, s1 + s2, s2 − s1, s1 − s3) into `outs`.
    fn input_quad(p: [&[f32]; 4], q: [&[f32]; 4], k: f32, outs: [&mut [f32]; 4]) {
        let [p0, p1, p2, p3] = p;
        let [q0, q1, q2, q3] = q;
        let [a, b, c, d] = outs;
        let n = a.len();
        let (p0, p1, p2, p3, q0, q1, q2, q3) =
            (&p0[..n], &p1[..n], &p2[..n], &p3[..n], &q0[..n], &q1[..n], &q2[..n], &q3[..n]);
        let (b, c, d) = (&mut b[..n], &mut c[..n], &mut d[..n]);
        for i in 0..n {
            let (s0, s1, s2, s3) = (p0[i] + k * q0[i], p1[i] + k * q1[i], p2[i] + k * q2[i], p3[i] + k * q3[i]);
            a[i] = s0 - s2;
            b[i] = s1 + s2;
            c[i] = s2 - s1;
            d[i] = s1 - s3;
        }
    }
}

simd_dispatch! {
    /// Y = Aᵀ M A + bias for a row of tiles, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]: the tiles'
    /// top output rows into `top`, bottom rows into `bottom` (2 values per tile).
    fn transform_outputs(ms: [&[f32]; 16], bias: f32, top: &mut [f32], bottom: &mut [f32]) {
        let tw = ms[0].len();
        let m: [&[f32]; 16] = ms.map(|x| &x[..tw]);
        let (top, bottom) = (&mut top[..2 * tw], &mut bottom[..2 * tw]);
        for tx in 0..tw {
            let mut s = [[0f32; 4]; 2];
            for c in 0..4 {
                let (m0, m1, m2, m3) = (m[c][tx], m[4 + c][tx], m[8 + c][tx], m[12 + c][tx]);
                s[0][c] = m0 + m1 + m2;
                s[1][c] = m1 - m2 - m3;
            }
            top[2 * tx] = s[0][0] + s[0][1] + s[0][2] + bias;
            top[2 * tx + 1] = s[0][1] - s[0][2] - s[0][3] + bias;
            bottom[2 * tx] = s[1][0] + s[1][1] + s[1][2] + bias;
            bottom[2 * tx + 1] = s[1][1] - s[1][2] - s[1][3] + bias;
        }
    }
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
        assert!(max_diff(super::conv3x3(&x, &w, Some(&b), false).unwrap(), want) < 1e-4);
    }

    #[test]
    fn bf16_tiles_stay_within_bf16_rounding_of_burns_conv2d() {
        // 64 input channels and 64 columns (32 tiles per row): the AMX path where the CPU has
        // it; 2 images, an odd height (a ragged last tile row) and 40 output channels (padded
        // rows of the tile product).
        let (x, w, b) = (random([2, 64, 7, 64]), random([40, 64, 3, 3]) * 0.1, random([40]));
        let options = ConvOptions { stride: [1; 2], padding: [(1, 1); 2], dilation: [1; 2], groups: 1 };
        let want = conv2d(x.clone(), w.clone(), Some(b.clone()), options);
        let scale: f32 = want.clone().abs().max().into_scalar();
        let diff = max_diff(super::conv3x3(&x, &w, Some(&b), true).unwrap(), want);
        let amx = cfg!(target_arch = "x86_64") && super::super::amx::available();
        eprintln!("bf16 3x3 convolution (AMX: {amx}): largest difference {diff:.1e} of {scale:.1}");
        // Transformed operands rounded to bf16 (2^-9 relative) in sums of 64·16 terms.
        assert!(diff <= 2e-2 * scale, "{diff} of {scale}");
        if amx {
            assert!(diff > 1e-4, "the tiles round to bf16: an f32-exact answer means they were not used");
        }
    }

    #[test]
    fn normalising_and_doubling_as_it_reads_gives_the_materialised_inputs_answer() {
        use super::super::{group_affine, group_norm};
        use super::{ConvInput, conv3x3, conv3x3_with};
        let data = |t: burn::tensor::Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        // Two images, odd sizes (ragged tiles), 4 groups of 2 channels.
        let (x, w, b) = (random([2, 8, 7, 9]), random([5, 8, 3, 3]), random([5]));
        let (gw, gb) = (random::<1>([8]), random::<1>([8]));
        let normed = group_norm(&x, 4, 1e-6, &gw, &gb, true).unwrap();
        let want = conv3x3(&normed, &w, Some(&b), false).unwrap();
        let affine = Some(group_affine(&x, 4, 1e-6, &gw, &gb).unwrap());
        let input = ConvInput { affine, silu: true, upsample: false };
        // The same values reach the same products: equal to the bit.
        assert_eq!(data(conv3x3_with(&x, &w, Some(&b), false, &input).unwrap()), data(want));
        let doubled = x.clone().reshape([2, 8, 7, 1, 9, 1]).expand([2, 8, 7, 2, 9, 2]).reshape([2, 8, 14, 18]);
        let want = conv3x3(&doubled, &w, Some(&b), false).unwrap();
        let input = ConvInput { upsample: true, ..Default::default() };
        assert_eq!(data(conv3x3_with(&x, &w, Some(&b), false, &input).unwrap()), data(want));
        // Normalised and doubled, over many bands of 2 tile rows, against burn's conv2d.
        let (x, w) = (random([1, 3, 21, 600]), random([300, 3, 3, 3]));
        let (gw, gb) = (random::<1>([3]), random::<1>([3]));
        let normed = group_norm(&x, 1, 1e-6, &gw, &gb, true).unwrap();
        let doubled = normed.reshape([1, 3, 21, 1, 600, 1]).expand([1, 3, 21, 2, 600, 2]).reshape([1, 3, 42, 1200]);
        let options = ConvOptions { stride: [1; 2], padding: [(1, 1); 2], dilation: [1; 2], groups: 1 };
        let want = conv2d(doubled, w.clone(), None, options);
        let affine = Some(group_affine(&x, 1, 1e-6, &gw, &gb).unwrap());
        let input = ConvInput { affine, silu: true, upsample: true };
        assert!(max_diff(conv3x3_with(&x, &w, None, false, &input).unwrap(), want) < 1e-4);
    }

    #[test]
    fn bands_cover_a_tall_image() {
        // 300 output channels over 1024 tile columns: bands of a few tile rows, the last ragged.
        let (x, w) = (random([1, 2, 40, 2048]), random([300, 2, 3, 3]));
        let options = ConvOptions { stride: [1; 2], padding: [(1, 1); 2], dilation: [1; 2], groups: 1 };
        let want = conv2d(x.clone(), w.clone(), None, options);
        assert!(max_diff(super::conv3x3(&x, &w, None, false).unwrap(), want) < 1e-4);
    }
}
