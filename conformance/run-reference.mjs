// Run the conformance suite against the reference server (@durable-streams/server,
// file-backed, in a temporary data dir) and print its pass/fail/skip counts and
// failing cases.  For comparison with `broker serve`; not part of the pytest run.
//
//   node run-reference.mjs [--long-poll-timeout-ms 500] [--json results.json]
import { spawn } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { DurableStreamTestServer } from "@durable-streams/server"

const here = dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2)
const opt = (name, fallback) => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : fallback
}
// The same settings tests/test_conformance.py gives `broker serve`.
const longPollTimeout = Number(opt("--long-poll-timeout-ms", "500"))
const dataDir = mkdtempSync(join(tmpdir(), "ds-reference-"))
const jsonOut = opt("--json", join(dataDir, "results.json"))

const server = new DurableStreamTestServer({
  port: 0,
  host: "127.0.0.1",
  dataDir,
  longPollTimeout,
})
const url = await server.start()
console.error(`reference server on ${url} (long-poll timeout ${longPollTimeout} ms)`)

// vitest runs as a child process, so this process's event loop keeps serving.
const started = Date.now()
const exitCode = await new Promise((resolve) => {
  const child = spawn(
    process.execPath,
    [join(here, "node_modules", "vitest", "vitest.mjs"), "run",
     "--reporter=dot", "--reporter=json", `--outputFile.json=${jsonOut}`],
    {
      cwd: here,
      stdio: ["ignore", "inherit", "inherit"],
      env: {
        ...process.env,
        CONFORMANCE_BASE_URL: url,
        CONFORMANCE_LONG_POLL_TIMEOUT_MS: String(Math.max(3000, longPollTimeout + 2000)),
      },
    }
  )
  child.on("close", (code) => resolve(code))
})
const seconds = ((Date.now() - started) / 1000).toFixed(1)
await server.stop()

const report = JSON.parse(readFileSync(jsonOut, "utf8"))
const counts = { passed: 0, failed: 0, skipped: 0 }
const failed = []
for (const file of report.testResults) {
  for (const t of file.assertionResults) {
    if (t.status === "passed") counts.passed++
    else if (t.status === "failed") {
      counts.failed++
      failed.push([...t.ancestorTitles, t.title].join(" > "))
    } else counts.skipped++
  }
}
console.log(
  `reference @durable-streams/server: ${counts.passed} passed, ${counts.failed} failed, ` +
    `${counts.skipped} skipped in ${seconds} s (vitest exit ${exitCode})`
)
for (const name of failed) console.log(`  FAILED ${name}`)
if (opt("--json") === undefined) rmSync(dataDir, { recursive: true, force: true })
else console.log(`results: ${jsonOut}; data dir kept: ${dataDir}`)
