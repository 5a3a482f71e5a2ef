import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // Cases without their own timeout (most of them); the long-poll cases get
    // CONFORMANCE_LONG_POLL_TIMEOUT_MS + 1 s from the suite itself.
    testTimeout: 20_000,
    hookTimeout: 20_000,
    // One file, one worker: the suite is sequential apart from a few
    // test.concurrent TTL cases.
    fileParallelism: false,
    watch: false,
  },
})
