// One error hierarchy for the whole library. Every error carries a stable string `code` that programs can
// switch on; messages say what was wrong and what to do about it.

export type TsepErrorCode =
  | 'TSEP_LIBRARY_NOT_FOUND'
  | 'TSEP_CUDA_ERROR'
  | 'TSEP_NVRTC_ERROR'
  | 'TSEP_COMPILE_ERROR'
  | 'TSEP_NCCL_ERROR'
  | 'TSEP_NVSHMEM_ERROR'
  | 'TSEP_RENDEZVOUS_ERROR'
  | 'TSEP_TIMEOUT'
  | 'TSEP_VALIDATION_ERROR'
  | 'TSEP_DISPOSED'
  | 'TSEP_NO_GPU'
  | 'TSEP_UNSUPPORTED';

export class TsepError extends Error {
  readonly code: TsepErrorCode;
  constructor(code: TsepErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TsepError';
    this.code = code;
  }
}

/** A native library (libcuda, libnvrtc, libnccl) could not be found or loaded. */
export class LibraryNotFoundError extends TsepError {
  readonly library: string;
  readonly searched: readonly string[];
  /** `envVar` names a file, or with `envNames: 'folder'` an install folder. */
  constructor(
    library: string,
    searched: readonly string[],
    envVar: string,
    reasons: readonly string[] = [],
    envNames: 'file' | 'folder' = 'file',
  ) {
    const tried = searched.length
      ? searched.map((p, i) => `  - ${p}${reasons[i] ? ` (${reasons[i]})` : ''}`).join('\n')
      : '  (no candidate location exists here)';
    super(
      'TSEP_LIBRARY_NOT_FOUND',
      `Could not load ${library}. Searched:\n${tried}\n` +
        `Install it, or set ${envVar} to the full path of the ${envNames === 'file' ? 'library file' : 'install folder'}.`,
    );
    this.name = 'LibraryNotFoundError';
    this.library = library;
    this.searched = searched;
  }
}

/** A native library call returned a non-success status: the call, the status and its name. */
export class NativeCallError extends TsepError {
  readonly call: string;
  readonly status: number;
  readonly statusName: string;
  constructor(
    code: TsepErrorCode,
    call: string,
    status: number,
    statusName: string,
    description: string,
    hint = '',
  ) {
    super(code, `${call} failed: ${statusName} (${status}): ${description}${hint ? `. ${hint}` : ''}`);
    this.name = 'NativeCallError';
    this.call = call;
    this.status = status;
    this.statusName = statusName;
  }
}

/** A CUDA driver call returned a non-success status. */
export class CudaError extends NativeCallError {
  constructor(call: string, status: number, statusName: string, description: string, hint = '') {
    super('TSEP_CUDA_ERROR', call, status, statusName, description, hint);
    this.name = 'CudaError';
  }
}

/** An NVRTC call (other than a compilation the source failed: CompileError) returned a non-success status. */
export class NvrtcError extends NativeCallError {
  constructor(call: string, status: number, statusName: string) {
    super('TSEP_NVRTC_ERROR', call, status, statusName, 'NVRTC reported an error');
    this.name = 'NvrtcError';
  }
}

/** An NVSHMEM host call failed; `statusName` is NVSHMEM's name for `status`. */
export class NvshmemError extends NativeCallError {
  constructor(call: string, status: number, statusName: string, description: string, hint = '') {
    super('TSEP_NVSHMEM_ERROR', call, status, statusName, description, hint);
    this.name = 'NvshmemError';
  }
}

/** NVRTC or nvcc rejected a kernel source; `log` holds the compiler's output. */
export class CompileError extends TsepError {
  readonly log: string;
  constructor(what: string, log: string) {
    super('TSEP_COMPILE_ERROR', `Compiling ${what} failed:\n${log.trim()}`);
    this.name = 'CompileError';
    this.log = log;
  }
}

/** An NCCL call returned a non-success status. */
export class NcclError extends TsepError {
  readonly call: string;
  readonly status: number;
  constructor(call: string, status: number, description: string) {
    super('TSEP_NCCL_ERROR', `${call} failed: NCCL status ${status}: ${description}`);
    this.name = 'NcclError';
    this.call = call;
    this.status = status;
  }
}

/** The process group could not meet: a store operation timed out, or ranks never arrived. */
export class RendezvousError extends TsepError {
  readonly key: string | undefined;
  readonly missingRanks: readonly number[];
  constructor(message: string, details: { key?: string; missingRanks?: readonly number[] } = {}) {
    super('TSEP_RENDEZVOUS_ERROR', message);
    this.name = 'RendezvousError';
    this.key = details.key;
    this.missingRanks = details.missingRanks ?? [];
  }
}

/** A bounded wait (host or device) expired; the message says who waited for what. */
export class EpTimeoutError extends TsepError {
  constructor(message: string) {
    super('TSEP_TIMEOUT', message);
    this.name = 'EpTimeoutError';
  }
}

/** A public call got an argument it cannot take. Thrown before any work starts. */
export class ValidationError extends TsepError {
  readonly argument: string;
  constructor(argument: string, got: string, need: string) {
    super('TSEP_VALIDATION_ERROR', `Invalid ${argument}: got ${got}; need ${need}.`);
    this.name = 'ValidationError';
    this.argument = argument;
  }
}

/** A resource was used after dispose()/destroy(). */
export class DisposedError extends TsepError {
  constructor(what: string) {
    super('TSEP_DISPOSED', `${what} was used after it was disposed; create a new one.`);
    this.name = 'DisposedError';
  }
}
