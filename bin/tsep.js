#!/usr/bin/env node
// Entry point of the `tsep` command: the TypeScript sources when they are present and this Node.js can
// run them (a checkout), else the compiled dist/ (an installed package).
import { existsSync } from 'node:fs';

const src = new URL('../src/cli/main.ts', import.meta.url);
const built = new URL('../dist/cli/main.js', import.meta.url);
const canRunTs = Boolean(process.features?.typescript);
await import(existsSync(src) && canRunTs ? src.href : built.href);
