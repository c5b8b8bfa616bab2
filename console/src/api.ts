// The API client: every call carries the token from sessionStorage (never a URL).

const KEY = "blockvault.token";

export type Role = "auditor" | "operator" | "admin";
export const RANK: Record<Role, number> = { auditor: 0, operator: 1, admin: 2 };

export class ApiError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

export function token(): string | null {
  return sessionStorage.getItem(KEY);
}
export function setToken(t: string | null): void {
  if (t === null) sessionStorage.removeItem(KEY);
  else sessionStorage.setItem(KEY, t);
}

/** Called when the server no longer knows the token (401). */
export let onUnauthorized: (msg: string) => void = () => {};
export function setOnUnauthorized(f: (msg: string) => void): void {
  onUnauthorized = f;
}

/**
 * The message of an error body: the one place that knows the API's error shape, either
 * `{"error": "..."}` or `{"error": {"kind", "message"}}` (and plain text from a proxy).
 */
export function errorMessage(v: any): string {
  if (v && typeof v === "object") {
    if (typeof v.error === "string") return v.error;
    if (v.error && typeof v.error.message === "string") return v.error.message;
  }
  return typeof v === "string" ? v : "";
}

export async function api<T = any>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = {};
  const t = token();
  if (t) headers["Authorization"] = `Bearer ${t}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(`/api/v1${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let v: any = null;
  try {
    v = text ? JSON.parse(text) : null;
  } catch {
    v = text;
  }
  if (!r.ok) {
    const msg = errorMessage(v) || r.statusText;
    if (r.status === 401) onUnauthorized(msg);
    throw new ApiError(r.status, `${r.status}: ${msg}`);
  }
  return v as T;
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < u.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i === 0 ? x : x.toFixed(1)} ${u[i]}`;
}

export function age(iso: string | null | undefined): string {
  if (!iso) return "—";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 90) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function duration(s: number | null | undefined): string {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

/** GET `path` as bytes (an image): an object URL for an <img>, with the token in a header. */
export async function apiBlobUrl(path: string): Promise<string> {
  const t = token();
  const r = await fetch(`/api/v1${path}`, { headers: t ? { Authorization: `Bearer ${t}` } : {} });
  if (!r.ok) {
    let v: any = await r.text();
    try {
      v = JSON.parse(v);
    } catch {}
    throw new ApiError(r.status, `${r.status}: ${errorMessage(v) || r.statusText}`);
  }
  return URL.createObjectURL(await r.blob());
}
