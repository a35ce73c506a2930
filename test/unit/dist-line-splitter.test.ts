// The launcher's line splitting: partial lines, \r\n, lone \r, and the flush at the end.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LineSplitter } from '../../src/dist/line-splitter.ts';

function split(chunks: string[]): string[] {
  const lines: string[] = [];
  const splitter = new LineSplitter((line) => lines.push(line.toString('utf8')));
  for (const c of chunks) splitter.push(Buffer.from(c));
  splitter.end();
  return lines;
}

test('joins partial lines and keeps terminators', () => {
  assert.deepEqual(split(['hel', 'lo\nwor', 'ld\n', '\n']), ['hello\n', 'world\n', '\n']);
});

test('a last line without a terminator is flushed with one', () => {
  assert.deepEqual(split(['a\nb']), ['a\n', 'b\n']);
  assert.deepEqual(split(['a\n']), ['a\n']);
  assert.deepEqual(split([]), []);
});

test('\\r\\n is one terminator, even split across chunks; a lone \\r ends a line', () => {
  assert.deepEqual(split(['a\r\nb\r', '\nc']), ['a\r\n', 'b\r\n', 'c\n']);
  assert.deepEqual(split([' 10%\r', ' 20%\r', ' 30%\n']), [' 10%\r', ' 20%\r', ' 30%\n']);
  assert.deepEqual(split(['x\r']), ['x\r']);
});

test('multi-byte characters split across chunks stay whole', () => {
  const bytes = Buffer.from('héllo → wörld\n');
  const lines: Buffer[] = [];
  const splitter = new LineSplitter((line) => lines.push(line));
  for (let i = 0; i < bytes.length; i++) splitter.push(bytes.subarray(i, i + 1));
  assert.deepEqual(lines, [bytes]);
});
