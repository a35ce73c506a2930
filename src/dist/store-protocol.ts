// Operation and status codes of the TCP store, shared by server and client. Request and response fields
// per operation (all framed by frame.ts):
//
//   SET     [key, value]                      -> OK []
//   GET     [key]                 (blocks)    -> OK [value]
//   ADD     [key, i64 delta]                  -> OK [i64 new value] | NOT_INTEGER []
//   WAIT    [key...]              (blocks)    -> OK []
//   CHECK   [key...]                          -> OK [one byte per key: 1 present, 0 absent]
//   DELETE  [key]                             -> OK [u8 existed]
//   CAS     [key, u8 hasExpected, expected, desired] -> OK [u8 swapped, u8 hasValue, value]
//   CANCEL  [u32 id of a blocking request]    -> no response (the client gave up waiting)

/** Request tags. */
export const Op = {
  SET: 1,
  GET: 2,
  ADD: 3,
  WAIT: 4,
  CHECK: 5,
  DELETE: 6,
  CAS: 7,
  CANCEL: 8,
} as const;

/** Response tags. */
export const Status = {
  OK: 0,
  NOT_INTEGER: 1,
} as const;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Encodes a key or text value. */
export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Decodes a key or text value. */
export function fromUtf8(bytes: Uint8Array): string {
  return decoder.decode(bytes);
}

/** A one-byte boolean field. */
export function flag(value: boolean): Uint8Array {
  return Uint8Array.of(value ? 1 : 0);
}

/** An 8-byte big-endian signed integer field (ADD's delta and result). */
export function i64(value: bigint): Uint8Array {
  const out = Buffer.allocUnsafe(8);
  out.writeBigInt64BE(value);
  return out;
}

/** Reads an {@link i64} field. */
export function readI64(bytes: Uint8Array): bigint {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).readBigInt64BE(0);
}

/** A 4-byte big-endian unsigned integer field (CANCEL's request id). */
export function u32(value: number): Uint8Array {
  const out = Buffer.allocUnsafe(4);
  out.writeUInt32BE(value);
  return out;
}

/** Reads a {@link u32} field. */
export function readU32(bytes: Uint8Array): number {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).readUInt32BE(0);
}
