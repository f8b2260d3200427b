# The mix compiler that installs the NIF and the sidecar binary into
# priv/native, from precompiled artifacts (mix/precompiled.exs) or from
# cargo. Required by mix.exs, after mix/precompiled.exs; not part of the
# library.

defmodule Mix.Tasks.Compile.PresenceNif do
  @moduledoc """
  Installs the `presence_nif` library and the `presence_sidecar` binary in
  `priv/native/`, where `Drab.Presence.Native` loads the library and
  `Drab.Presence.Backend.Sidecar` starts the binary.

  From a release (a package or a tag with
  `checksum-Elixir.Drab.Presence.Native.exs`), it fetches the artifacts of
  this target from `DRAB_PRESENCE_BASE_URL` (default: the release's URL,
  `:precompiled_url` in mix.exs; `file://` or http(s)), checks each against
  the checksum file before installing any, and keeps them in the user
  cache. A checksum that does not match stops the build: nothing is
  installed. Without an artifact for this target, or when the download
  fails, it builds with cargo if there is one; with neither, the error
  says both ways out.

  Without a checksum file (a checkout of the repository), or with
  `DRAB_PRESENCE_BUILD=1`, it builds with cargo, which decides what is
  stale (a no-op build costs well under a second). Cargo's output is found
  where `CARGO_TARGET_DIR` and `CARGO_BUILD_TARGET` put it.

  With `config :drab_presence, nif: false` (teams that allow no NIF), only
  the sidecar is installed: the NIF is neither built nor downloaded, and
  `Drab.Presence.Native` is compiled without its `@on_load`.

  hex.pm is out of reach here, so neither the rustler mix package nor
  rustler_precompiled is a dependency: this is the small part of them we
  need.
  """
  use Mix.Task.Compiler

  alias DrabPresence.Precompiled

  @crate "presence_nif"
  @sidecar "presence_sidecar"

  @impl Mix.Task.Compiler
  def run(_args) do
    kinds =
      if Application.get_env(:drab_presence, :nif, true) == false,
        do: [:sidecar],
        else: [:nif, :sidecar]

    checksums = Precompiled.read_checksums(checksum_path())

    # What an earlier build installed and this one leaves out (the NIF,
    # after `nif: false`) must not stay behind, to be shipped in a release.
    for kind <- [:nif, :sidecar] -- kinds,
        do: File.rm(Path.join(native_dir(), Precompiled.installed_name(kind)))

    result =
      cond do
        force_build?() -> cargo(kinds, "DRAB_PRESENCE_BUILD=1")
        checksums == :none -> cargo(kinds, nil)
        true -> precompiled(kinds, elem(checksums, 1))
      end

    case result do
      :ok -> {:ok, []}
      :noop -> {:noop, []}
      {:error, message} -> error(message)
    end
  end

  @impl Mix.Task.Compiler
  def manifests, do: [manifest_path()]

  @impl Mix.Task.Compiler
  def clean do
    File.rm(manifest_path())

    for kind <- [:nif, :sidecar],
        do: File.rm(Path.join(native_dir(), Precompiled.installed_name(kind)))

    :ok
  end

  defp force_build?, do: System.get_env("DRAB_PRESENCE_BUILD") in ["1", "true"]

  # Mix runs a dependency's compilers in its directory.
  defp project_dir, do: File.cwd!()
  defp checksum_path, do: Path.join(project_dir(), Precompiled.checksum_file_name())
  defp native_dir, do: Path.join(Mix.Project.app_path(), "priv/native")
  defp manifest_path, do: Path.join(Mix.Project.manifest_path(), "compile.presence_nif")

  defp base_url do
    case System.get_env("DRAB_PRESENCE_BASE_URL") do
      url when is_binary(url) and url != "" -> url
      _ -> Mix.Project.config()[:precompiled_url]
    end
  end

  ## Precompiled

  defp precompiled(kinds, checksums) do
    version = Mix.Project.config()[:version]
    target = Precompiled.target()

    with {:ok, wanted} <- artifacts(kinds, version, target, checksums) do
      installed = read_manifest()

      if Enum.all?(wanted, fn {kind, name, sum} -> installed[kind] == {name, sum} end) and
           Enum.all?(kinds, &File.exists?(Path.join(native_dir(), Precompiled.installed_name(&1)))) do
        :noop
      else
        fetch_and_install(wanted)
      end
    else
      {:fallback, why} -> fallback(kinds, why)
    end
  end

  # Every artifact this build needs, with its checksum; a missing one is a
  # reason to build with cargo instead.
  defp artifacts(kinds, version, target, checksums) do
    Enum.reduce_while(kinds, {:ok, []}, fn kind, {:ok, acc} ->
      with {:ok, nif_version} <- nif_version(kind),
           name = Precompiled.artifact_name(kind, version, target, nif_version),
           {:ok, sum} <- Map.fetch(checksums, name) do
        {:cont, {:ok, acc ++ [{kind, name, sum}]}}
      else
        :no_nif_version ->
          {:halt,
           {:fallback,
            "no precompiled NIF for this VM's NIF version #{:erlang.system_info(:nif_version)} " <>
              "(built for #{Enum.join(Precompiled.nif_versions(), ", ")}: OTP 22 and later)"}}

        :error ->
          {:halt,
           {:fallback,
            "no precompiled artifact for #{target} in #{Precompiled.checksum_file_name()} " <>
              "(released for #{Enum.join(Precompiled.targets(), ", ")})"}}
      end
    end)
  end

  defp nif_version(:sidecar), do: {:ok, nil}

  defp nif_version(:nif) do
    case Precompiled.nif_version() do
      {:ok, version} -> {:ok, version}
      :error -> :no_nif_version
    end
  end

  # All fetched and checked before any is installed: a bad checksum leaves
  # priv/native as it was.
  defp fetch_and_install(wanted) do
    fetched =
      Enum.reduce_while(wanted, {:ok, []}, fn {kind, name, sum}, {:ok, acc} ->
        case fetch_verified(name, sum) do
          {:ok, contents} -> {:cont, {:ok, [{kind, name, sum, contents} | acc]}}
          {:error, _} = error -> {:halt, error}
          {:fallback, _} = fallback -> {:halt, fallback}
        end
      end)

    case fetched do
      {:ok, fetched} ->
        for {kind, name, _sum, contents} <- Enum.reverse(fetched) do
          install(contents, Precompiled.installed_name(kind), kind == :sidecar)
          Mix.shell().info("Installed precompiled #{name}")
        end

        write_manifest(Map.new(fetched, fn {kind, name, sum, _} -> {kind, {name, sum}} end))
        :ok

      {:fallback, why} ->
        fallback(Enum.map(wanted, &elem(&1, 0)), why)

      {:error, _} = error ->
        error
    end
  end

  # From the cache (checked again: a file there may have been damaged),
  # else from the base URL; cached once checked.
  defp fetch_verified(name, sum) do
    cached = Path.join(cache_dir(), name)

    with {:ok, data} <- File.read(cached),
         :ok <- Precompiled.verify(name, data, sum, cached) do
      Precompiled.untar(data, name)
    else
      _ ->
        File.rm(cached)
        base_url = base_url()

        case Precompiled.fetch(base_url, name) do
          {:ok, data, source} ->
            with :ok <- Precompiled.verify(name, data, sum, source),
                 {:ok, contents} <- Precompiled.untar(data, name) do
              cache(cached, data)
              {:ok, contents}
            end

          {:error, why} ->
            {:fallback, "could not fetch #{name}: #{why}"}
        end
    end
  end

  defp cache_dir do
    :filename.basedir(:user_cache, ~c"drab_presence") |> List.to_string()
  end

  # A cache that cannot be written only costs a download next time.
  defp cache(path, data) do
    with :ok <- File.mkdir_p(Path.dirname(path)), do: File.write(path, data)
  end

  defp fallback(kinds, why) do
    case find_cargo() do
      {:ok, _cargo} ->
        Mix.shell().info("drab_presence: #{why}; building from source with cargo")
        cargo(kinds, nil)

      {:error, _} ->
        {:error,
         "drab_presence: #{why}, and cargo is not on PATH to build it from source. " <>
           "Either install Rust (https://rustup.rs) and compile again, or point " <>
           "DRAB_PRESENCE_BASE_URL at a folder or URL holding this target's artifacts " <>
           "(scripts/package builds them)."}
    end
  end

  defp read_manifest do
    case File.read(manifest_path()) do
      {:ok, binary} -> :erlang.binary_to_term(binary)
      {:error, _} -> %{}
    end
  rescue
    ArgumentError -> %{}
  end

  defp write_manifest(installed) do
    File.mkdir_p!(Path.dirname(manifest_path()))
    File.write!(manifest_path(), :erlang.term_to_binary(installed))
  end

  ## Cargo

  defp cargo(kinds, why) do
    # Release everywhere: the tests exercise the build that ships, and the
    # crates are small enough that an optimised build costs seconds.
    profile = System.get_env("DRAB_PRESENCE_CARGO_PROFILE", "release")
    features = if Mix.env() == :test and :nif in kinds, do: ["--features", "test-hooks"], else: []
    packages = Enum.flat_map(kinds, &["--package", crate(&1)])
    args = ["build" | packages] ++ ["--profile", profile] ++ features
    if why, do: Mix.shell().info("drab_presence: #{why}: building from source")

    with {:ok, cargo} <- find_cargo(),
         :ok <- cargo_build(cargo, args),
         :ok <- install_built(kinds, profile) do
      File.rm(manifest_path())
      :ok
    end
  end

  defp crate(:nif), do: @crate
  defp crate(:sidecar), do: @sidecar

  defp find_cargo do
    case System.find_executable("cargo") || existing(Path.expand("~/.cargo/bin/cargo")) do
      nil -> {:error, "cargo not found: install Rust (https://rustup.rs) to build #{@crate}"}
      cargo -> {:ok, cargo}
    end
  end

  defp existing(path), do: if(File.exists?(path), do: path)

  defp cargo_build(cargo, args) do
    Mix.shell().info("Compiling #{@crate} (cargo #{Enum.join(args, " ")})")

    case System.cmd(cargo, args,
           cd: project_dir(),
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> :ok
      {_, status} -> {:error, "cargo build of #{@crate} failed with exit status #{status}"}
    end
  end

  defp install_built(kinds, profile) do
    dir = cargo_output_dir(System.get_env(), project_dir(), profile)

    Enum.reduce_while(kinds, :ok, fn kind, :ok ->
      source = Path.join(dir, built_name(kind))

      if File.exists?(source) do
        install(File.read!(source), Precompiled.installed_name(kind), kind == :sidecar)
        {:cont, :ok}
      else
        {:halt, {:error, "cargo reported success but #{source} is missing"}}
      end
    end)
  end

  @doc """
  Where cargo leaves a `profile` build of the workspace in `project_dir`:
  `CARGO_TARGET_DIR` (relative to `project_dir`, as cargo reads it there)
  or `target/`, then the `CARGO_BUILD_TARGET` triple when one is set,
  then the profile's directory.
  """
  @spec cargo_output_dir(%{optional(String.t()) => String.t()}, Path.t(), String.t()) :: Path.t()
  def cargo_output_dir(env, project_dir, profile) do
    target_dir = Path.expand(non_empty(env["CARGO_TARGET_DIR"]) || "target", project_dir)
    triple = non_empty(env["CARGO_BUILD_TARGET"])
    profile_dir = if profile == "dev", do: "debug", else: profile
    Path.join(Enum.reject([target_dir, triple, profile_dir], &is_nil/1))
  end

  defp non_empty(""), do: nil
  defp non_empty(value), do: value

  defp built_name(:sidecar) do
    if match?({:win32, _}, :os.type()), do: @sidecar <> ".exe", else: @sidecar
  end

  defp built_name(:nif) do
    case :os.type() do
      {:win32, _} -> "#{@crate}.dll"
      {:unix, :darwin} -> "lib#{@crate}.dylib"
      _ -> "lib#{@crate}.so"
    end
  end

  # Written under a temporary name and renamed into place: a running VM
  # that has the old library mapped, or a running sidecar, keeps a valid
  # file.
  defp install(contents, name, executable?) do
    File.mkdir_p!(native_dir())
    dest = Path.join(native_dir(), name)
    tmp = dest <> ".tmp"
    File.write!(tmp, contents)
    File.chmod!(tmp, if(executable?, do: 0o755, else: 0o644))
    File.rename!(tmp, dest)
  end

  defp error(message) do
    Mix.shell().error(message)

    {:error,
     [
       %Mix.Task.Compiler.Diagnostic{
         compiler_name: "presence_nif",
         file: Path.join(project_dir(), "native/#{@crate}/Cargo.toml"),
         message: message,
         position: nil,
         severity: :error
       }
     ]}
  end
end
