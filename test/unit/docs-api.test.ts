// docs/api.md documents the package root: every name src/index.ts exports appears in one of its inline code
// spans, and every exported error class has a row in its Errors table with the code src/errors.ts gives it.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';

const read = (path: string): string => readFileSync(new URL(`../../${path}`, import.meta.url), 'utf8');

const index = read('src/index.ts');
const errors = read('src/errors.ts');
const api = read('docs/api.md');

/** Every name the module exports: `export { a, type B, c as d } from` blocks and direct declarations. */
function exportedNames(source: string): string[] {
  const text = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '');
  const names = new Set<string>();
  for (const m of text.matchAll(/export\s+(?:type\s+)?\{([^}]*)\}/g)) {
    for (const entry of m[1]!.split(',')) {
      const words = entry.trim().split(/\s+/).filter(Boolean);
      if (words.length === 0) continue;
      const as = words.indexOf('as');
      names.add(as >= 0 ? words[as + 1]! : words[words.length - 1]!);
    }
  }
  const declaration =
    /export\s+(?:declare\s+)?(?:abstract\s+)?(?:const|let|var|function\*?|class|interface|type|enum)\s+(\w+)/g;
  for (const m of text.matchAll(declaration)) names.add(m[1]!);
  return [...names].sort();
}

/** The inline code spans of a Markdown text, outside fenced code blocks. */
function inlineCodeSpans(markdown: string): string[] {
  const prose = markdown.replace(/^```[^\n]*\n[\s\S]*?^```$/gm, '');
  return [...prose.matchAll(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g)].map((m) => m[2]!);
}

/** Class name → the code its constructor passes to super(), for the error classes that fix one. */
function errorCodes(source: string): Map<string, string | undefined> {
  const codes = new Map<string, string | undefined>();
  for (const m of source.matchAll(/export class (\w+) extends \w+ \{([\s\S]*?)\n\}/g)) {
    codes.set(m[1]!, /super\(\s*'(TSEP_[A-Z0-9_]+)'/.exec(m[2]!)?.[1]);
  }
  return codes;
}

/** The rows of api.md's Errors table, as [class, code] pairs. */
function errorTableRows(markdown: string): [string, string][] {
  const section = markdown.split(/^## /m).find((s) => s.startsWith('Errors\n'));
  assert.ok(section, 'docs/api.md has a "## Errors" section');
  const rows: [string, string][] = [];
  for (const m of section.matchAll(/^\| `(\w+)` \| `(\w+)` \|/gm)) rows.push([m[1]!, m[2]!]);
  return rows;
}

const escapeRegExp = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('docs/api.md', () => {
  const names = exportedNames(index);
  const spans = inlineCodeSpans(api);

  it('the parsers see the exports, the code spans and the Errors table', () => {
    for (const name of ['EpBuffer', 'HostTensor', 'DTYPES', 'Group', 'DeviceInfo', 'TsepErrorCode']) {
      assert.ok(names.includes(name), `src/index.ts exports ${name}`);
    }
    assert.ok(names.length >= 60, `${names.length} exports found`);
    assert.ok(spans.includes('EpBuffer.create(group, options): Promise<EpBuffer>'));
    assert.ok(!spans.some((s) => s.includes('\n```')), 'fenced blocks are not taken for spans');
    assert.deepEqual(errorTableRows(api)[0], ['ValidationError', 'TSEP_VALIDATION_ERROR']);
  });

  it('names every export of src/index.ts in an inline code span', () => {
    const missing = names.filter((name) => {
      const word = new RegExp(`(?<![\\w$])${escapeRegExp(name)}(?![\\w$])`);
      return !spans.some((span) => word.test(span));
    });
    assert.deepEqual(
      missing,
      [],
      `exports of src/index.ts not documented in docs/api.md: ${missing.join(', ')}`,
    );
  });

  it('lists every exported error class in the Errors table with its code from src/errors.ts', () => {
    const codes = errorCodes(errors);
    const rows = errorTableRows(api);
    const errorClasses = names.filter((n) => n.endsWith('Error'));
    assert.ok(errorClasses.length >= 10, `${errorClasses.length} error classes exported`);
    for (const cls of errorClasses) {
      assert.ok(codes.has(cls), `${cls} is a class of src/errors.ts`);
      const code = codes.get(cls);
      const documented = rows.filter(([c]) => c === cls).map(([, c]) => c);
      assert.ok(documented.length > 0, `${cls} has a row in api.md's Errors table`);
      if (code !== undefined) {
        assert.deepEqual(documented, [code], `${cls}'s row gives its code ${code}`);
      }
    }
  });

  it('gives every TsepErrorCode a row, under TsepError where no subclass owns it', () => {
    const union = /export type TsepErrorCode =([^;]*);/.exec(errors)?.[1] ?? '';
    const all = [...union.matchAll(/'(TSEP_[A-Z0-9_]+)'/g)].map((m) => m[1]!);
    assert.ok(all.length >= 10, `${all.length} codes in TsepErrorCode`);
    const owned = new Set([...errorCodes(errors).values()]);
    const rows = errorTableRows(api);
    for (const code of all) {
      const row = rows.find(([, c]) => c === code);
      assert.ok(row, `${code} has a row in api.md's Errors table`);
      if (!owned.has(code)) assert.equal(row[0], 'TsepError', `${code} is raised as a plain TsepError`);
    }
  });
});
