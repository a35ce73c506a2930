// The TCP store's wire format. Every message is one length-prefixed frame:
//
//   u32 bodyLength | u8 tag | u32 id | u32 fieldCount | (u32 fieldLength | field bytes)*
//
// `tag` is the operation in a request and the status in a response; `id` matches a response to its request
// so one connection can carry many requests at once. All integers are big-endian.

/** Largest frame either side accepts; guards against a peer that is not a tsep store (or garbage). */
export const MAX_FRAME_BYTES = 1024 * 1024 * 1024;

const HEADER_BYTES = 4 + 1 + 4 + 4;

/** One decoded frame. `fields` are views into the received bytes (copy before keeping them long). */
export interface Frame {
  tag: number;
  id: number;
  fields: Uint8Array[];
}

/** Encodes one frame, ready to write to a socket. */
export function encodeFrame(tag: number, id: number, fields: readonly Uint8Array[]): Buffer {
  let body = HEADER_BYTES - 4;
  for (const f of fields) body += 4 + f.byteLength;
  if (body > MAX_FRAME_BYTES) {
    throw new RangeError(`store frame of ${body} bytes exceeds the ${MAX_FRAME_BYTES}-byte limit`);
  }
  const out = Buffer.allocUnsafe(4 + body);
  out.writeUInt32BE(body, 0);
  out.writeUInt8(tag, 4);
  out.writeUInt32BE(id, 5);
  out.writeUInt32BE(fields.length, 9);
  let at = HEADER_BYTES;
  for (const f of fields) {
    out.writeUInt32BE(f.byteLength, at);
    out.set(f, at + 4);
    at += 4 + f.byteLength;
  }
  return out;
}

/**
 * Reassembles frames from a byte stream that arrives in arbitrary chunks. Chunks are only concatenated
 * once a whole frame is present, so a large value costs one copy however it was split.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  /** Adds received bytes and returns every frame they complete. Throws on a malformed stream. */
  push(chunk: Buffer): Frame[] {
    this.chunks.push(chunk);
    this.buffered += chunk.byteLength;
    const frames: Frame[] = [];
    while (this.buffered >= 4) {
      const head = this.peek(4);
      const body = head.readUInt32BE(0);
      if (body < HEADER_BYTES - 4 || body > MAX_FRAME_BYTES) {
        throw new RangeError(`malformed store frame: body length ${body}`);
      }
      if (this.buffered < 4 + body) break;
      frames.push(parseBody(this.take(4 + body).subarray(4)));
    }
    return frames;
  }

  /** Returns the first `n` buffered bytes without consuming them. */
  private peek(n: number): Buffer {
    if (this.chunks[0]!.byteLength < n) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0]!;
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const rest = all.subarray(n);
    this.chunks = rest.byteLength > 0 ? [rest] : [];
    this.buffered = rest.byteLength;
    return all.subarray(0, n);
  }
}

function parseBody(body: Buffer): Frame {
  const tag = body.readUInt8(0);
  const id = body.readUInt32BE(1);
  const count = body.readUInt32BE(5);
  const fields: Uint8Array[] = [];
  let at = 9;
  for (let i = 0; i < count; i++) {
    if (at + 4 > body.byteLength) throw new RangeError('malformed store frame: truncated field header');
    const len = body.readUInt32BE(at);
    if (at + 4 + len > body.byteLength) throw new RangeError('malformed store frame: truncated field');
    // Plain Uint8Array views, not Buffers: values reach users, who may compare them with Uint8Arrays.
    fields.push(new Uint8Array(body.buffer, body.byteOffset + at + 4, len));
    at += 4 + len;
  }
  if (at !== body.byteLength) throw new RangeError('malformed store frame: trailing bytes');
  return { tag, id, fields };
}
