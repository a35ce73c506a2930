// Element types and the host-side number formats: bf16 and fp8 e4m3 conversions and the per-128-channel
// FP8 quantizer. The device kernels reproduce `quantizeFp8Block` operation for operation (IEEE f32 divide,
// reciprocal and multiply, round-to-nearest-even conversion), so both sides agree bit for bit.

export type DType = 'bf16' | 'f16' | 'f32' | 'i32' | 'i64' | 'u8' | 'fp8_e4m3' | 'bool';

export const DTYPES: readonly DType[] = ['bf16', 'f16', 'f32', 'i32', 'i64', 'u8', 'fp8_e4m3', 'bool'];

const SIZES: Record<DType, number> = { bf16: 2, f16: 2, f32: 4, i32: 4, i64: 8, u8: 1, fp8_e4m3: 1, bool: 1 };

/** Bytes per element. */
export function dtypeSize(dtype: DType): number {
  return SIZES[dtype];
}

export function isDType(value: unknown): value is DType {
  return typeof value === 'string' && (DTYPES as readonly string[]).includes(value);
}

/** The TypedArray kind that views a dtype's raw elements (bf16/f16 as raw 16-bit codes, fp8/bool as bytes). */
export type ElementArray<D extends DType> = D extends 'f32'
  ? Float32Array
  : D extends 'i32'
    ? Int32Array
    : D extends 'i64'
      ? BigInt64Array
      : D extends 'bf16' | 'f16'
        ? Uint16Array
        : Uint8Array;

// The TypedArray kind of each dtype's raw elements (ElementArray<D>): what elementView makes and the
// checks expect.
const ARRAY_OF = {
  f32: Float32Array,
  i32: Int32Array,
  i64: BigInt64Array,
  bf16: Uint16Array,
  f16: Uint16Array,
  u8: Uint8Array,
  fp8_e4m3: Uint8Array,
  bool: Uint8Array,
} as const satisfies Record<DType, unknown>;

export function elementView<D extends DType>(
  dtype: D,
  buffer: ArrayBufferLike,
  byteOffset: number,
  length: number,
): ElementArray<D> {
  // Every kind takes (buffer, byteOffset, length); TypeScript cannot call a union of constructors.
  const View = ARRAY_OF[dtype] as unknown as new (
    buffer: ArrayBufferLike,
    byteOffset: number,
    length: number,
  ) => ElementArray<D>;
  return new View(buffer, byteOffset, length);
}

/** Whether `data` is the typed array kind that holds `dtype`'s raw elements (a bf16 tensor's is a Uint16Array). */
export function holdsElementsOf(dtype: DType, data: unknown): boolean {
  return data instanceof ARRAY_OF[dtype];
}

/** The name of the typed array kind that holds `dtype`'s raw elements, for messages. */
export function elementArrayName(dtype: DType): string {
  return ARRAY_OF[dtype].name;
}

// Scratch views for reinterpreting one float32 as its bits.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32Bits(x: number): number {
  f32[0] = x;
  return u32[0]!;
}

export function bitsToF32(bits: number): number {
  u32[0] = bits >>> 0;
  return f32[0]!;
}

// ---------------------------------------------------------------------------------------------- bf16

/** float32 -> bf16 code, round to nearest even; NaN stays NaN (quietened), infinities stay infinite. */
export function f32ToBf16(x: number): number {
  const bits = f32Bits(x);
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return (bits >>> 16) | 0x0040;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** bf16 code -> float32 value (exact). */
export function bf16ToF32(code: number): number {
  return bitsToF32((code & 0xffff) << 16);
}

export function f32ArrayToBf16(src: ArrayLike<number>, out = new Uint16Array(src.length)): Uint16Array {
  for (let i = 0; i < src.length; i++) out[i] = f32ToBf16(src[i]!);
  return out;
}

export function bf16ArrayToF32(src: ArrayLike<number>, out = new Float32Array(src.length)): Float32Array {
  const bits = new Uint32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < src.length; i++) bits[i] = (src[i]! & 0xffff) << 16;
  return out;
}

// ---------------------------------------------------------------------------------------------- fp8 e4m3

export const FP8_E4M3_MAX = 448;

function roundHalfEven(v: number): number {
  const f = Math.floor(v);
  const d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * float32 -> fp8 e4m3 (the "fn" variant: no infinities, 0x7f/0xff is NaN), round to nearest even,
 * saturating to ±448 as CUDA's `cvt.rn.satfinite.e4m3x2.f32` does. NaN stays NaN.
 */
export function f32ToFp8E4m3(x: number): number {
  const v = Math.fround(x);
  if (Number.isNaN(v)) return 0x7f | (f32Bits(v) >>> 31 ? 0x80 : 0);
  const sign = f32Bits(v) >>> 31 ? 0x80 : 0;
  const a = Math.abs(v);
  if (a >= FP8_E4M3_MAX) return sign | 0x7e;
  // Below 2^-6 the code is the number of 2^-9 steps; from there on each octave e has 8 steps of 2^(e-3).
  // The mapping is continuous across the boundary, so a carry out of the mantissa lands on the next octave.
  if (a < 2 ** -6) return sign | roundHalfEven(a * 512);
  const e = ((f32Bits(a) >>> 23) & 0xff) - 127;
  const q = roundHalfEven(a / 2 ** (e - 3));
  return sign | (((e + 7) << 3) + q - 8);
}

/** fp8 e4m3 code -> float32 value (exact). */
export function fp8E4m3ToF32(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const exp = (code >> 3) & 0xf;
  const mant = code & 7;
  if (exp === 0xf && mant === 7) return Number.NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (1 + mant / 8) * 2 ** (exp - 7);
}

// ---------------------------------------------------------------------------------------------- FP8 blocks

/** Channels per FP8 scale. */
export const FP8_BLOCK = 128;
const AMAX_FLOOR = Math.fround(1e-4);

export interface Fp8QuantOptions {
  /** Round each scale up to a power of two (required by `ue8m0`). */
  roundScale?: boolean;
  /** Also return the scales as UE8M0 bytes packed four per int32 (implies `roundScale`). */
  ue8m0?: boolean;
}

/** Number of float32 scales per row (one per 128 channels, the last block may be partial). */
export function fp8ScaleCount(hidden: number): number {
  return Math.ceil(hidden / FP8_BLOCK);
}

/** Number of int32 words per row when UE8M0 scale bytes are packed four per word. */
export function ue8m0WordCount(hidden: number): number {
  return Math.ceil(fp8ScaleCount(hidden) / 4);
}

/** Rounds a positive normal float32 up to the next power of two (itself if it already is one). */
export function ceilPow2F32(x: number): number {
  const bits = f32Bits(x);
  if ((bits & 0x007fffff) === 0) return Math.fround(x);
  return bitsToF32(((bits & 0xff800000) + 0x00800000) >>> 0);
}

/**
 * Quantizes one block of channels. Returns the dequantization scale (x ≈ fp8 · scale).
 * amax = max(|x|, 1e-4); scale = amax / 448 (f32 divide), optionally rounded up to a power of two;
 * each value becomes e4m3(x · (1 / scale)), the reciprocal and product rounded to f32.
 */
export function quantizeFp8Block(
  src: ArrayLike<number>,
  srcOffset: number,
  count: number,
  out: Uint8Array,
  outOffset: number,
  roundScale: boolean,
): number {
  let amax = 0;
  for (let i = 0; i < count; i++) amax = Math.max(amax, Math.abs(src[srcOffset + i]!));
  amax = Math.max(amax, AMAX_FLOOR);
  let scale = Math.fround(amax / FP8_E4M3_MAX);
  if (roundScale) scale = ceilPow2F32(scale);
  const mult = Math.fround(1 / scale);
  for (let i = 0; i < count; i++) out[outOffset + i] = f32ToFp8E4m3(Math.fround(src[srcOffset + i]! * mult));
  return scale;
}

export interface Fp8Quantized {
  /** e4m3 codes, row-major [rows, hidden]. */
  data: Uint8Array;
  /** float32 dequantization scales, row-major [rows, ceil(hidden/128)]. */
  scales: Float32Array;
  /** UE8M0 exponent bytes packed four per int32, row-major [rows, ceil(hidden/512)]; only with `ue8m0`. */
  packed?: Int32Array;
}

/** Quantizes a row-major [rows, hidden] float32 matrix per row, per 128 channels. */
export function quantizeFp8(
  x: ArrayLike<number>,
  rows: number,
  hidden: number,
  options: Fp8QuantOptions = {},
): Fp8Quantized {
  const roundScale = options.roundScale === true || options.ue8m0 === true;
  const s = fp8ScaleCount(hidden);
  const data = new Uint8Array(rows * hidden);
  const scales = new Float32Array(rows * s);
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < s; b++) {
      const c0 = b * FP8_BLOCK;
      const n = Math.min(FP8_BLOCK, hidden - c0);
      scales[r * s + b] = quantizeFp8Block(x, r * hidden + c0, n, data, r * hidden + c0, roundScale);
    }
  }
  if (!options.ue8m0) return { data, scales };
  return { data, scales, packed: packUe8m0(scales, rows, s) };
}

/** Packs power-of-two float32 scales [rows, s] into UE8M0 bytes, four per int32 (block 4j+i in byte i). */
export function packUe8m0(scales: ArrayLike<number>, rows: number, s: number): Int32Array {
  const words = Math.ceil(s / 4);
  const packed = new Int32Array(rows * words);
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < s; b++) {
      const byte = (f32Bits(scales[r * s + b]!) >>> 23) & 0xff;
      packed[r * words + (b >> 2)]! |= byte << (8 * (b & 3));
    }
  }
  return packed;
}

/** Unpacks UE8M0 words [rows, ceil(s/4)] into float32 scales [rows, s] (byte << 23 read as float32). */
export function unpackUe8m0(packed: ArrayLike<number>, rows: number, s: number): Float32Array {
  const words = Math.ceil(s / 4);
  const scales = new Float32Array(rows * s);
  for (let r = 0; r < rows; r++) {
    for (let b = 0; b < s; b++) {
      const byte = (packed[r * words + (b >> 2)]! >>> (8 * (b & 3))) & 0xff;
      scales[r * s + b] = bitsToF32(byte << 23);
    }
  }
  return scales;
}

/** Dequantizes e4m3 codes [rows, hidden] with float32 scales [rows, ceil(hidden/128)]. */
export function dequantizeFp8(
  data: ArrayLike<number>,
  scales: ArrayLike<number>,
  rows: number,
  hidden: number,
): Float32Array {
  const s = fp8ScaleCount(hidden);
  const out = new Float32Array(rows * hidden);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < hidden; c++) {
      out[r * hidden + c] = fp8E4m3ToF32(data[r * hidden + c]!) * scales[r * s + Math.floor(c / FP8_BLOCK)]!;
    }
  }
  return out;
}
