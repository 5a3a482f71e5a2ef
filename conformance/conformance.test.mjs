// Durable Streams server conformance suite, run against an already-running
// server.  The server is started by whoever runs vitest: tests/test_conformance.py
// starts `broker serve`, run-reference.mjs starts the reference server.
//
//   CONFORMANCE_BASE_URL               server root, e.g. http://127.0.0.1:8080 (required)
//   CONFORMANCE_LONG_POLL_TIMEOUT_MS   upper bound on the server's long-poll wait;
//                                      the suite gives each long-poll case this + 1 s
//                                      (default 3000; start the server with a shorter
//                                      long-poll timeout, e.g. 500 ms)
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL
if (!baseUrl) {
  throw new Error(
    "CONFORMANCE_BASE_URL is not set: point it at a running server, e.g. " +
      "CONFORMANCE_BASE_URL=http://127.0.0.1:8080 npx vitest run"
  )
}
const longPollTimeoutMs = Number(
  process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS ?? "3000"
)

runConformanceTests({ baseUrl: baseUrl.replace(/\/+$/, ""), longPollTimeoutMs })
