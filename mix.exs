# The mix compiler that installs the NIF and the sidecar (precompiled or
# built with cargo), and the task that packages them for a release; both
# name artifacts through DrabPresence.Precompiled.
for file <- ~w(precompiled.exs compile.presence_nif.exs drab_presence.package.exs),
    do: Code.require_file(Path.join("mix", file), __DIR__)

defmodule DrabPresence.MixProject do
  use Mix.Project

  @version "0.1.0"
  @source_url "https://github.com/drab-presence/drab_presence"

  def project do
    [
      app: :drab_presence,
      version: @version,
      # The oldest Elixir the whole suite has run on (README, "Supported
      # versions"); scripts/check_api.exs keeps elixir/ on its API.
      elixir: "~> 1.10",
      elixirc_paths: elixirc_paths(Mix.env()),
      compilers: [:presence_nif] ++ Mix.compilers(),
      start_permanent: Mix.env() == :prod,
      deps: [],
      package: package(),
      description: "Drab.Presence on a Rust presence table: O(1) counts, coalesced diffs.",
      source_url: @source_url,
      docs: docs(),
      # Where Mix.Tasks.Compile.PresenceNif fetches the precompiled NIF and
      # sidecar of a release (DRAB_PRESENCE_BASE_URL overrides it).
      precompiled_url: "#{@source_url}/releases/download/v#{@version}",
      test_coverage: [ignore_modules: [Mix.Tasks.Compile.PresenceNif]],
      # Optional: called only when the app has Phoenix (Broadcast.delivery/2)
      # or :telemetry (Drab.Presence.Telemetry). Elixir 1.11-1.13 otherwise
      # warn, when :telemetry is loadable, that we use an app we do not
      # depend on.
      xref: [exclude: [Phoenix.PubSub, Phoenix.Channel.Server, :telemetry]]
    ]
  end

  def application do
    [mod: {Drab.Presence.Application, []}, extra_applications: [:logger]]
  end

  defp elixirc_paths(:test), do: ["elixir", "test/support"]
  defp elixirc_paths(_), do: ["elixir"]

  defp package do
    [
      licenses: ["MIT"],
      links: %{
        "GitHub" => @source_url,
        "Changelog" => "#{@source_url}/blob/main/CHANGELOG.md",
        "Drab" => "https://github.com/grych/drab"
      },
      # The checksum file is written by scripts/package when a release is
      # cut (see DESIGN.md, "Releasing"); a package without it builds
      # from source.
      files: ~w(elixir mix native/presence_core/src native/presence_core/Cargo.toml
                native/presence_nif/src native/presence_nif/Cargo.toml
                native/presence_sidecar/src native/presence_sidecar/Cargo.toml
                Cargo.toml Cargo.lock mix.exs checksum-Elixir.Drab.Presence.Native.exs
                README.md DESIGN.md ARCHITECTURE.md CHANGELOG.md LICENSE)
    ]
  end

  # ExDoc (not a dependency here: `mix docs` needs ex_doc added where hex
  # is reachable). The README is the user guide; DESIGN.md holds the
  # design, the sidecar's protocol and the benchmarks.
  defp docs do
    [
      main: "readme",
      source_ref: "v#{@version}",
      extras: ["README.md", "DESIGN.md", "ARCHITECTURE.md", "CHANGELOG.md", "LICENSE"]
    ]
  end
end
