// @vitest-environment node
import { afterEach, describe, expect, it, vi } from "vitest";
import { ApiError, HttpSource } from "../api";
import type { Job } from "../api";
import { job } from "./fixtures";

afterEach(() => vi.unstubAllGlobals());

function respond(status: number, body: unknown) {
  return Promise.resolve(new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } }));
}

describe("HttpSource", () => {
  it("sends the token, encodes ids and reads one-line error details", async () => {
    const fetch = vi.fn((_url: string, _init?: RequestInit) => respond(404, { detail: "bundle id 'a b' is not a bundle" }));
    vi.stubGlobal("fetch", fetch);
    const source = new HttpSource("", "T0K");
    const failure = source.cube("runs/a b", "energy");
    await expect(failure).rejects.toBeInstanceOf(ApiError);
    await expect(source.cube("runs/a b", "energy")).rejects.toThrow("bundle id 'a b' is not a bundle");
    const [url, init] = fetch.mock.calls[0];
    expect(url).toBe("/api/bundles/runs/a%20b/cube?metric=energy&max_tokens=128");
    expect((init?.headers as Record<string, string>).Authorization).toBe("Bearer T0K");
  });
  it("polls a job until it ends when server-sent events are unavailable", async () => {
    vi.stubGlobal("EventSource", undefined);
    const states: Job[] = [job({ state: "queued" }), job(), job({ state: "done", result: "x.analysis" })];
    const fetch = vi.fn(() => respond(200, states.shift()));
    vi.stubGlobal("fetch", fetch);
    const seen: string[] = [];
    await new Promise<void>((resolve) => {
      new HttpSource("", null, 1).watchJob("j1", (j) => {
        seen.push(j.state);
        if (j.state === "done") resolve();
      });
    });
    expect(seen).toEqual(["queued", "running", "done"]);
    await new Promise((r) => setTimeout(r, 20));
    expect(fetch).toHaveBeenCalledTimes(3); // stops once the job has ended
  });
  it("falls back to polling when the event stream fails", async () => {
    class FailingEventSource {
      onmessage: ((e: MessageEvent) => void) | null = null;
      onerror: (() => void) | null = null;
      constructor(readonly url: string) {
        setTimeout(() => this.onerror?.(), 0);
      }
      close() {}
    }
    vi.stubGlobal("EventSource", FailingEventSource);
    vi.stubGlobal("fetch", vi.fn(() => respond(200, job({ state: "failed", error: "boom" }))));
    const got = await new Promise<Job>((resolve) => new HttpSource("", "T", 1).watchJob("j1", resolve));
    expect(got.error).toBe("boom");
  });
});
