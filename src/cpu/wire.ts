// The byte format of what a rank contributes to one exchange: a JSON header (scalars and tensor
// descriptors) followed by the tensors' raw row-major bytes, each section 8-byte aligned so typed
// arrays can view it in place.

import { type DType, elementView } from '../device/dtypes.ts';
import { HostTensor, numel } from '../device/tensor.ts';

export type WireScalar = number | string | boolean;

export interface WireMessage {
  readonly meta: Readonly<Record<string, WireScalar>>;
  readonly tensors: Readonly<Record<string, HostTensor>>;
}

interface TensorEntry {
  name: string;
  dtype: DType;
  shape: number[];
  offset: number;
}

const align8 = (n: number): number => Math.ceil(n / 8) * 8;

export function encodeMessage(
  meta: Record<string, WireScalar>,
  tensors: Record<string, HostTensor | undefined>,
): Uint8Array {
  const entries: TensorEntry[] = [];
  const bodies: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    if (!t) continue;
    const body = t.contiguous().bytes().subarray(0, t.byteLength);
    entries.push({ name, dtype: t.dtype, shape: [...t.shape], offset });
    bodies.push(body);
    offset = align8(offset + body.length);
  }
  const header = new TextEncoder().encode(JSON.stringify({ meta, tensors: entries }));
  const start = align8(4 + header.length);
  const out = new Uint8Array(start + offset);
  new DataView(out.buffer).setUint32(0, header.length, true);
  out.set(header, 4);
  for (let i = 0; i < entries.length; i++) out.set(bodies[i]!, start + entries[i]!.offset);
  return out;
}

export function decodeMessage(bytes: Uint8Array): WireMessage {
  // A view at an unaligned offset cannot back typed arrays; copy it once.
  const buf = bytes.byteOffset % 8 === 0 ? bytes : bytes.slice();
  const headerLength = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(buf.subarray(4, 4 + headerLength))) as {
    meta: Record<string, WireScalar>;
    tensors: TensorEntry[];
  };
  const start = buf.byteOffset + align8(4 + headerLength);
  const tensors: Record<string, HostTensor> = {};
  for (const e of header.tensors) {
    const data = elementView(e.dtype, buf.buffer, start + e.offset, numel(e.shape));
    tensors[e.name] = HostTensor.from(e.dtype, e.shape, data);
  }
  return { meta: header.meta, tensors };
}
