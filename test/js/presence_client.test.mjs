// Replays the presence_state and presence_diffs that Drab.Presence sent in
// test/drab/presence/js_trace_test.exs through the real phoenix.js Presence
// client, and checks the client's state against list/1 after every diff.
import { test } from "node:test"
import assert from "node:assert/strict"
import { existsSync, readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { Presence } from "phoenix"

const tracePath =
  process.env.DRAB_PRESENCE_JS_TRACE ??
  fileURLToPath(new URL("../../_build/js_trace.json", import.meta.url))

function loadTrace() {
  if (!existsSync(tracePath)) {
    assert.fail(
      `No presence trace at ${tracePath}. It is recorded by the ExUnit suite: run ` +
        "`mix test test/drab/presence/js_trace_test.exs` (or all of `mix test`) first, " +
        "with the same DRAB_PRESENCE_JS_TRACE if you set one."
    )
  }
  const [state, ...diffs] = JSON.parse(readFileSync(tracePath, "utf8"))
  assert.equal(state?.event, "presence_state", "the trace starts with presence_state")
  assert.ok(diffs.length > 0, "the trace has presence_diffs")
  for (const diff of diffs) assert.equal(diff.event, "presence_diff")
  return { state, diffs }
}

// Metas of a key are compared as sets: their order is not part of the contract.
const byRef = (a, b) => (a.phx_ref < b.phx_ref ? -1 : a.phx_ref > b.phx_ref ? 1 : 0)

function normalize(presences) {
  return Object.fromEntries(
    Object.entries(presences).map(([key, presence]) => [
      key,
      { ...presence, metas: [...presence.metas].sort(byRef) },
    ])
  )
}

function assertState(actual, expected, step) {
  assert.deepStrictEqual(normalize(actual), normalize(expected), `client state after ${step}`)
}

// As in phoenix's own assets/test/presence_test.js.
function channelStub() {
  return {
    ref: 1,
    events: {},
    on(event, callback) {
      this.events[event] = callback
    },
    // The client mutates what it is given; the trace must stay intact.
    trigger(event, data) {
      this.events[event](structuredClone(data))
    },
    joinRef() {
      return `${this.ref}`
    },
    simulateDisconnectAndReconnect() {
      this.ref++
    },
  }
}

test("Presence.syncState and syncDiff reproduce list/1 after every diff", () => {
  const { state, diffs } = loadTrace()
  let current = Presence.syncState({}, structuredClone(state.payload))
  assertState(current, state.payload, "presence_state")

  for (const diff of diffs) {
    current = Presence.syncDiff(current, diff.payload)
    if (diff.expected) assertState(current, diff.expected, diff.step)
  }
})

test("a Presence on a channel follows presence_state and presence_diff events", () => {
  const { state, diffs } = loadTrace()
  const channel = channelStub()
  const presence = new Presence(channel)
  let syncs = 0
  presence.onSync(() => syncs++)

  channel.trigger("presence_state", state.payload)
  assertState(presence.state, state.payload, "presence_state")

  for (const diff of diffs) {
    channel.trigger("presence_diff", diff.payload)
    if (diff.expected) {
      assertState(presence.state, diff.expected, diff.step)
      assert.equal(presence.list().length, Object.keys(diff.expected).length)
    }
  }
  assert.equal(syncs, diffs.length + 1)
})

test("diffs that arrive during a rejoin are applied after its presence_state", () => {
  const { state, diffs } = loadTrace()
  const checked = diffs.flatMap((diff, i) => (diff.expected ? [i] : []))
  const rejoinAt = checked[Math.floor(checked.length / 2)]
  const channel = channelStub()
  const presence = new Presence(channel)

  channel.trigger("presence_state", state.payload)
  diffs.slice(0, rejoinAt + 1).forEach((diff) => channel.trigger("presence_diff", diff.payload))
  const before = diffs[rejoinAt].expected
  assertState(presence.state, before, diffs[rejoinAt].step)

  // Diffs sent while the channel rejoins wait for the new presence_state,
  // here the server state they were computed against.
  channel.simulateDisconnectAndReconnect()
  const buffered = diffs.slice(rejoinAt + 1, rejoinAt + 11)
  buffered.forEach((diff) => channel.trigger("presence_diff", diff.payload))
  assert.ok(presence.inPendingSyncState())
  assertState(presence.state, before, "buffered diffs")

  channel.trigger("presence_state", before)
  const last = buffered.findLast((diff) => diff.expected)
  if (last) assertState(presence.state, last.expected, `${last.step}, after the rejoin`)

  for (const diff of diffs.slice(rejoinAt + 11)) {
    channel.trigger("presence_diff", diff.payload)
    if (diff.expected) assertState(presence.state, diff.expected, diff.step)
  }
})
