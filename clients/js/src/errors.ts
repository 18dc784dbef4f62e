import type { ErrorFrame } from "./frames";
import { type ErrorCode, TRANSIENT_ERROR_CODES } from "./wire";

/** Codes the client raises itself, never sent by a server. */
export type ClientErrorCode =
  | "timeout"
  | "disconnected"
  | "not_connected"
  | "closed"
  | "bad_frame";

/**
 * An `unsubscribed` notice's `reason` (the server dropped a subscription by
 * itself) is reported with that reason as the code; it is an error code of
 * the gateway today, but any string is passed on rather than lost.
 */
export type GatewayErrorCode = ErrorCode | ClientErrorCode;

/** An error with a machine-readable `code`: the server's, or the client's own. */
export class GatewayError<C extends string = GatewayErrorCode | (string & {})> extends Error {
  readonly code: C;
  /** The `error` frame, when the server sent one. */
  readonly frame?: ErrorFrame | Record<string, unknown>;

  constructor(code: C, message?: string, frame?: ErrorFrame | Record<string, unknown>) {
    super(message || code);
    this.name = "GatewayError";
    this.code = code;
    if (frame !== undefined) this.frame = frame;
  }

  /** True for codes that mean "not now" (wire.TRANSIENT_ERROR_CODES). */
  get transient(): boolean {
    return TRANSIENT_ERROR_CODES.has(this.code as ErrorCode);
  }

  /** Narrows `code`: `if (error.is("forbidden")) ...` */
  is<K extends GatewayErrorCode>(code: K): this is GatewayError<K> {
    return (this.code as string) === code;
  }
}

/** `isGatewayError(e)` or `isGatewayError(e, "forbidden")`, for `catch (e: unknown)`. */
export function isGatewayError<K extends GatewayErrorCode>(
  error: unknown,
  code?: K,
): error is GatewayError<K> {
  return error instanceof GatewayError && (code === undefined || error.code === code);
}
