# Tests tagged :phoenix need the real phoenix_pubsub (and phoenix) on the
# code path, e.g. ERL_LIBS=/path/to/built/libs. They are never vendored here.
phoenix? = Code.ensure_loaded?(Phoenix.PubSub)

unless phoenix? do
  IO.puts(
    "Skipping tests tagged :phoenix: Phoenix.PubSub is not on the code path " <>
      "(point ERL_LIBS at built phoenix_pubsub and phoenix to run them)."
  )
end

# Tests tagged :drab run real Drab 0.10 in headless Chromium; they need Drab,
# Phoenix and Plug.Cowboy on the code path (ERL_LIBS), built outside the repo.
drab? = Enum.all?([Drab, Drab.Commander, Phoenix.Endpoint, Plug.Cowboy], &Code.ensure_loaded?/1)

unless drab? do
  IO.puts(
    "Skipping tests tagged :drab: Drab, Phoenix and Plug.Cowboy are not all on the code path " <>
      "(point ERL_LIBS at built drab, phoenix, plug_cowboy and their deps to run them)."
  )
end

# Tests tagged :telemetry attach handlers with the real :telemetry, built
# outside the repo; it is no dependency, so they need it on ERL_LIBS.
telemetry? = Code.ensure_loaded?(:telemetry)

unless telemetry? do
  IO.puts(
    "Skipping tests tagged :telemetry: :telemetry is not on the code path " <>
      "(point ERL_LIBS at a built telemetry to run them)."
  )
end

# Tests tagged :rustler_precompiled check our artifact names and checksum
# file against rustler_precompiled's own functions, built outside the repo.
rustler_precompiled? = Code.ensure_loaded?(RustlerPrecompiled)

unless rustler_precompiled? do
  IO.puts(
    "Skipping tests tagged :rustler_precompiled: RustlerPrecompiled is not on the code path " <>
      "(point ERL_LIBS at a built rustler_precompiled to run them)."
  )
end

# Drab.Presence runs for the whole suite, unlinked from any test process;
# tests use their own topics. Tests of restarts start and stop other modules.
# The backend comes from DRAB_PRESENCE_BACKEND (Drab.PresenceCase.backend/0):
# scripts/test runs the suite once per backend. Tests of NIF internals are
# tagged :nif_only, the sidecar's own (crash recovery, frames) :sidecar_only;
# cluster mode (:cluster) runs on both, its peers on the same backend.
backend = Drab.PresenceCase.backend()
IO.puts("Backend: #{backend}")
{:ok, presence} = Drab.Presence.start_link(diff_window: 20, backend: backend, pubsub_server: nil)
Process.unlink(presence)

# Logs of passing tests are noise (a presence module without a pubsub
# server warns where Phoenix is loaded, killed processes are reported, ...);
# a failing test shows its own.
ExUnit.start(
  capture_log: true,
  exclude:
    if(phoenix?, do: [], else: [:phoenix]) ++
      if(drab?, do: [], else: [:drab]) ++
      if(telemetry?, do: [], else: [:telemetry]) ++
      if(rustler_precompiled?, do: [], else: [:rustler_precompiled]) ++
      if(backend == :nif, do: [:sidecar_only], else: [:nif_only])
)
