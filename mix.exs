defmodule Mix.Tasks.Compile.PresenceNif do
  @moduledoc """
  Builds the `presence_nif` crate and the `presence_sidecar` binary with
  cargo and copies them to `priv/native/`, where `Drab.Presence.Native`
  loads the library and `Drab.Presence.Backend.Sidecar` starts the binary.

  hex.pm is out of reach here, so the rustler mix package is not an option;
  this is the small part of it we need. Cargo decides what is stale, so the
  task simply runs it on every compile (a no-op build takes well under a
  second).
  """
  use Mix.Task.Compiler

  @crate "presence_nif"
  @sidecar "presence_sidecar"

  @impl Mix.Task.Compiler
  def run(_args) do
    # Release everywhere: the tests exercise the build that ships, and the
    # crates are small enough that an optimised build costs seconds.
    profile = System.get_env("DRAB_PRESENCE_CARGO_PROFILE", "release")
    features = if Mix.env() == :test, do: ["--features", "test-hooks"], else: []
    args = ["build", "--package", @crate, "--package", @sidecar, "--profile", profile] ++ features

    with {:ok, cargo} <- find_cargo(),
         :ok <- cargo_build(cargo, args),
         :ok <- install(profile),
         :ok <- install_sidecar(profile) do
      {:ok, []}
    else
      {:error, message} ->
        Mix.shell().error(message)

        {:error,
         [
           %Mix.Task.Compiler.Diagnostic{
             compiler_name: "presence_nif",
             file: Path.expand("native/#{@crate}/Cargo.toml"),
             message: message,
             position: nil,
             severity: :error
           }
         ]}
    end
  end

  defp find_cargo do
    case System.find_executable("cargo") || existing(Path.expand("~/.cargo/bin/cargo")) do
      nil -> {:error, "cargo not found: install Rust (https://rustup.rs) to build #{@crate}"}
      cargo -> {:ok, cargo}
    end
  end

  defp existing(path), do: if(File.exists?(path), do: path)

  defp cargo_build(cargo, args) do
    Mix.shell().info("Compiling #{@crate} (cargo #{Enum.join(args, " ")})")

    case System.cmd(cargo, args, stderr_to_stdout: true, into: IO.stream(:stdio, :line)) do
      {_, 0} -> :ok
      {_, status} -> {:error, "cargo build of #{@crate} failed with exit status #{status}"}
    end
  end

  defp install(profile) do
    {source_name, dest_name} = library_names()
    install_file(profile, source_name, dest_name, nil)
  end

  defp install_sidecar(profile) do
    exe = if match?({:win32, _}, :os.type()), do: @sidecar <> ".exe", else: @sidecar
    install_file(profile, exe, @sidecar, 0o755)
  end

  # Copies a cargo output into priv/native under a temporary name and
  # renames it into place: a running VM that has the old library mapped,
  # or a running sidecar, keeps a valid file.
  defp install_file(profile, source_name, dest_name, mode) do
    target_dir = if profile == "dev", do: "debug", else: profile
    source = Path.join(["target", target_dir, source_name])
    dest_dir = Path.join(Mix.Project.app_path(), "priv/native")
    File.mkdir_p!(dest_dir)
    dest = Path.join(dest_dir, dest_name)

    if File.exists?(source) do
      tmp = dest <> ".tmp"
      File.cp!(source, tmp)
      if mode, do: File.chmod!(tmp, mode)
      File.rename!(tmp, dest)
      :ok
    else
      {:error, "cargo reported success but #{source} is missing"}
    end
  end

  defp library_names do
    case :os.type() do
      {:win32, _} -> {"#{@crate}.dll", "#{@crate}.dll"}
      {:unix, :darwin} -> {"lib#{@crate}.dylib", "lib#{@crate}.so"}
      _ -> {"lib#{@crate}.so", "lib#{@crate}.so"}
    end
  end
end

defmodule DrabPresence.MixProject do
  use Mix.Project

  @version "0.1.0"

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
      test_coverage: [ignore_modules: [Mix.Tasks.Compile.PresenceNif]],
      # Optional: called only when the app has Phoenix (Broadcast.delivery/2).
      xref: [exclude: [Phoenix.PubSub, Phoenix.Channel.Server]]
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
      files: ~w(elixir native/presence_core/src native/presence_core/Cargo.toml
                native/presence_nif/src native/presence_nif/Cargo.toml
                native/presence_sidecar/src native/presence_sidecar/Cargo.toml
                Cargo.toml Cargo.lock mix.exs README.md)
    ]
  end
end
