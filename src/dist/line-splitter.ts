// Splits a byte stream into lines for `tsep launch`'s per-rank output prefixes. A line ends at "\n",
// "\r\n" or a lone "\r" (progress bars redraw with "\r", and each redraw should carry its rank prefix).
// Splitting bytes, not text, is safe for UTF-8: neither byte occurs inside a multi-byte character.

const LF = 0x0a;
const CR = 0x0d;

/** Feeds chunks in, calls `onLine` with each complete line (terminator included). */
export class LineSplitter {
  private readonly onLine: (line: Buffer) => void;
  private pending: Buffer[] = [];
  // The pending bytes end in "\r": whether that is a line end or half of "\r\n" depends on the next byte.
  private heldCR = false;

  constructor(onLine: (line: Buffer) => void) {
    this.onLine = onLine;
  }

  /** Adds bytes; emits every line they complete and keeps the unterminated rest. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    let start = 0;
    if (this.heldCR) {
      this.heldCR = false;
      start = chunk[0] === LF ? 1 : 0;
      this.emit(chunk.subarray(0, start));
    }
    for (let i = start; i < chunk.length; i++) {
      const b = chunk[i];
      if (b !== LF && b !== CR) continue;
      if (b === CR && i + 1 === chunk.length) {
        this.heldCR = true;
        break;
      }
      if (b === CR && chunk[i + 1] === LF) i++;
      this.emit(chunk.subarray(start, i + 1));
      start = i + 1;
    }
    if (start < chunk.length) this.pending.push(chunk.subarray(start));
  }

  /** Flushes the last line; one that lacks a terminator gets a "\n". */
  end(): void {
    if (this.pending.length === 0) return;
    this.emit(this.heldCR ? Buffer.alloc(0) : Buffer.from('\n'));
    this.heldCR = false;
  }

  private emit(tail: Buffer): void {
    const line = this.pending.length > 0 ? Buffer.concat([...this.pending, tail]) : tail;
    this.pending = [];
    this.onLine(line);
  }
}
