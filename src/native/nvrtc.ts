// NVRTC through koffi: create, compile (on a worker thread, so the event loop keeps running and progress
// can be shown), fetch the cubin and the log. Non-zero nvrtcResult becomes an NvrtcError.

import { CompileError, NvrtcError } from '../errors.ts';
import { loadLibrary, NVRTC } from './loader.ts';

// biome-ignore lint/suspicious/noExplicitAny: FFI boundary
type Raw = any;
let fns: Record<string, Raw> | undefined;
let path = '';

function api(): Record<string, Raw> {
  if (fns) return fns;
  const loaded = loadLibrary(NVRTC);
  path = loaded.path;
  const l = loaded.lib;
  fns = {
    version: l.func('int nvrtcVersion(int *major, int *minor)'),
    errorString: l.func('const char *nvrtcGetErrorString(int result)'),
    create: l.func(
      'int nvrtcCreateProgram(_Out_ void **prog, const char *src, const char *name, int numHeaders, const char **headers, const char **includeNames)',
    ),
    compile: l.func('int nvrtcCompileProgram(void *prog, int numOptions, const char **options)'),
    logSize: l.func('int nvrtcGetProgramLogSize(void *prog, _Out_ size_t *size)'),
    log: l.func('int nvrtcGetProgramLog(void *prog, _Out_ uint8_t *log)'),
    cubinSize: l.func('int nvrtcGetCUBINSize(void *prog, _Out_ size_t *size)'),
    cubin: l.func('int nvrtcGetCUBIN(void *prog, _Out_ uint8_t *cubin)'),
    destroy: l.func('int nvrtcDestroyProgram(_Inout_ void **prog)'),
  };
  return fns;
}

function check(call: string, status: number): void {
  if (status === 0) return;
  const text = api().errorString(status) as string;
  throw new NvrtcError(call, status, text);
}

export function nvrtcPath(): string {
  api();
  return path;
}

/** NVRTC version as [major, minor]. */
export function nvrtcVersion(): [number, number] {
  const a = new Int32Array(1);
  const b = new Int32Array(1);
  check('nvrtcVersion', api().version(a, b));
  return [a[0]!, b[0]!];
}

export interface NvrtcSource {
  name: string;
  source: string;
  /** Headers the source may #include by name, given by content. */
  headers: Record<string, string>;
  options: string[];
}

function readLog(prog: unknown): string {
  const size = [0];
  check('nvrtcGetProgramLogSize', api().logSize(prog, size));
  const buf = new Uint8Array(Number(size[0]));
  check('nvrtcGetProgramLog', api().log(prog, buf));
  return Buffer.from(buf).toString('utf8').replace(/\0+$/, '');
}

/** Compiles a CUDA C++ source to a cubin off the main thread. Resolves with the cubin and the log. */
export async function nvrtcCompile(src: NvrtcSource): Promise<{ cubin: Uint8Array; log: string }> {
  const f = api();
  const progOut: unknown[] = [null];
  const names = Object.keys(src.headers);
  const contents = names.map((n) => src.headers[n]!);
  check('nvrtcCreateProgram', f.create(progOut, src.source, src.name, names.length, contents, names));
  const prog = progOut[0];
  try {
    const status = await new Promise<number>((resolve, reject) => {
      f.compile.async(prog, src.options.length, src.options, (err: unknown, res: number) =>
        err ? reject(err) : resolve(res),
      );
    });
    const log = readLog(prog);
    // NVRTC_ERROR_COMPILATION (6) means the source is wrong: show the compiler's log, not a status code.
    if (status === 6) throw new CompileError(src.name, log);
    check('nvrtcCompileProgram', status);
    const size = [0];
    check('nvrtcGetCUBINSize', f.cubinSize(prog, size));
    const cubin = new Uint8Array(Number(size[0]));
    check('nvrtcGetCUBIN', f.cubin(prog, cubin));
    return { cubin, log };
  } finally {
    f.destroy([prog]);
  }
}
