//! float8 values (PyTorch's `float8_e4m3fn` and `float8_e5m2`) to f32, exactly.

/// float8_e4m3fn (no infinities; S.1111.111 is NaN) to f32.
pub fn e4m3fn(b: u8) -> f32 {
    let (exp, man) = ((b >> 3) & 0xF, b & 7);
    let magnitude = if exp == 0xF && man == 7 {
        f32::NAN
    } else if exp == 0 {
        f32::from(man) * (1.0 / 512.0)
    } else {
        f32::from_bits((u32::from(exp) + 120) << 23 | u32::from(man) << 20)
    };
    if b & 0x80 != 0 { -magnitude } else { magnitude }
}

/// float8_e5m2 to f32: it is the upper byte of an f16.
pub fn e5m2(b: u8) -> f32 {
    half::f16::from_bits(u16::from(b) << 8).to_f32()
}
