# The native half of drab_presence at build time: the mix compiler that
# installs the NIF and the sidecar binary into priv/native, from
# precompiled artifacts or from cargo, and the task that packages those
# artifacts for a release. Required by mix.exs, so it runs in the mix
# process of whoever builds drab_presence (this repo, or an app that has
# it as a dependency); it is not part of the library.
#
# The artifacts follow rustler_precompiled's conventions, so that the
# tools and habits of that ecosystem apply (explorer, tokenizers,
# html5ever_elixir): a `.tar.gz` per target and NIF version on a release
# URL, named `lib<crate>-v<version>-nif-<nif version>-<target>.so.tar.gz`,
# and a `checksum-Elixir.Drab.Presence.Native.exs` shipped with the
# package, a map of those file names to "sha256:<hex>", checked before
# anything is installed. The sidecar is an executable, so its artifact
# has no NIF version: `presence_sidecar-v<version>-<target>.tar.gz`, in
# the same checksum file. rustler_precompiled itself is a hex package,
# and drab_presence builds with no hex dependency at all; the test suite
# checks these names and checksums against it where it is on ERL_LIBS.

defmodule DrabPresence.Precompiled do
  @moduledoc false
  # Names, targets, checksums, downloads and tarballs of the artifacts.

  @nif_crate "presence_nif"
  @sidecar "presence_sidecar"
  @checksum_module Drab.Presence.Native

  # NIF versions the NIF is built for: native/presence_nif/Cargo.toml
  # enables rustler's `nif_version_2_15` (OTP 22 and later load it).
  @nif_versions ["2.15"]

  # What a release carries artifacts for (scripts/package --help says how
  # CI builds them). A target outside this list builds with cargo.
  @targets ~w(
    aarch64-apple-darwin
    aarch64-unknown-linux-gnu
    aarch64-unknown-linux-musl
    x86_64-apple-darwin
    x86_64-unknown-linux-gnu
    x86_64-unknown-linux-musl
  )

  @doc "The release targets."
  @spec targets() :: [String.t()]
  def targets, do: @targets

  @doc "The NIF versions artifacts are built for."
  @spec nif_versions() :: [String.t()]
  def nif_versions, do: @nif_versions

  @doc "The module the checksum file is named after, as rustler_precompiled names it."
  @spec checksum_module() :: module()
  def checksum_module, do: @checksum_module

  @doc "`checksum-Elixir.Drab.Presence.Native.exs`."
  @spec checksum_file_name() :: String.t()
  def checksum_file_name, do: "checksum-#{@checksum_module}.exs"

  @doc """
  The artifact file names of `kind` (`:nif` or `:sidecar`) for `version`
  and `target` (a Rust target triple), as rustler_precompiled names a NIF.
  """
  @spec artifact_name(:nif | :sidecar, String.t(), String.t(), String.t() | nil) :: String.t()
  def artifact_name(kind, version, target, nif_version \\ hd(@nif_versions))

  def artifact_name(:nif, version, target, nif_version),
    do: "lib#{@nif_crate}-v#{version}-nif-#{nif_version}-#{target}.so.tar.gz"

  def artifact_name(:sidecar, version, target, _nif_version),
    do: "#{@sidecar}-v#{version}-#{target}.tar.gz"

  @doc "The file an artifact's contents are installed as, in priv/native."
  @spec installed_name(:nif | :sidecar) :: String.t()
  def installed_name(:nif), do: "lib#{@nif_crate}.so"
  def installed_name(:sidecar), do: @sidecar

  ## Targets

  @doc """
  The Rust target triple to fetch artifacts for: `CARGO_BUILD_TARGET` when
  set (what cargo would build for), else this VM's, normalised as
  rustler_precompiled does (`x86_64-pc-linux-gnu` becomes
  `x86_64-unknown-linux-gnu`, `aarch64-apple-darwin23.4.0`
  `aarch64-apple-darwin`).
  """
  @spec target(%{optional(String.t()) => String.t()}, String.t()) :: String.t()
  def target(env \\ System.get_env(), system_architecture \\ system_architecture()) do
    case env["CARGO_BUILD_TARGET"] do
      target when is_binary(target) and target != "" -> target
      _ -> normalize_target(system_architecture)
    end
  end

  defp system_architecture, do: List.to_string(:erlang.system_info(:system_architecture))

  @doc false
  @spec normalize_target(String.t()) :: String.t()
  def normalize_target(system_architecture) do
    parts = String.split(system_architecture, "-")

    triple =
      case parts do
        [arch, vendor, os, abi] -> %{arch: arch, vendor: vendor, os: os, abi: abi}
        [arch, vendor, os] -> %{arch: arch, vendor: vendor, os: os}
        _ -> nil
      end

    cond do
      triple == nil ->
        system_architecture

      triple.os =~ "darwin" ->
        arch = if triple.arch == "arm", do: "aarch64", else: triple.arch
        join(%{triple | arch: arch, os: "darwin"})

      triple.os =~ "linux" ->
        arch =
          case triple.arch do
            "amd64" -> "x86_64"
            "riscv64" -> "riscv64gc"
            arch -> arch
          end

        vendor = if triple.vendor == "pc", do: "unknown", else: triple.vendor
        join(%{triple | arch: arch, vendor: vendor})

      true ->
        join(triple)
    end
  end

  defp join(triple),
    do:
      [:arch, :vendor, :os, :abi]
      |> Enum.map(&triple[&1])
      |> Enum.reject(&is_nil/1)
      |> Enum.join("-")

  @doc """
  The NIF version of the artifacts this VM can load: its own if built,
  else the newest older minor of the same major (a VM loads NIFs of older
  minor versions). `:error` when none (OTP 21 and older).
  """
  @spec nif_version(String.t(), [String.t()]) :: {:ok, String.t()} | :error
  def nif_version(vm \\ List.to_string(:erlang.system_info(:nif_version)), built \\ @nif_versions) do
    [major, minor | _] = parse_version(vm)

    built
    |> Enum.map(&{parse_version(&1), &1})
    |> Enum.filter(fn {[m, n | _], _} -> m == major and n <= minor end)
    |> Enum.max_by(fn {parsed, _} -> parsed end, fn -> nil end)
    |> case do
      nil -> :error
      {_, version} -> {:ok, version}
    end
  end

  defp parse_version(version), do: version |> String.split(".") |> Enum.map(&String.to_integer/1)

  ## Checksums

  @doc "The sha256 of `data`, as the checksum file writes it: `\"sha256:<hex>\"`."
  @spec checksum(iodata()) :: String.t()
  def checksum(data), do: "sha256:" <> Base.encode16(:crypto.hash(:sha256, data), case: :lower)

  @doc """
  Reads a checksum file: `{:ok, %{file_name => "sha256:<hex>"}}`, or
  `:none` when there is no such file (a checkout of the repository, not a
  release). A file that is not such a map raises.
  """
  @spec read_checksums(Path.t()) :: {:ok, %{String.t() => String.t()}} | :none
  def read_checksums(path) do
    if File.exists?(path) do
      case Code.eval_file(path) do
        {%{} = map, _} ->
          if Enum.all?(map, fn {k, v} -> is_binary(k) and is_binary(v) end),
            do: {:ok, map},
            else: Mix.raise("#{path} is not a map of file names to checksums")

        _ ->
          Mix.raise("#{path} is not a map of file names to checksums")
      end
    else
      :none
    end
  end

  @doc """
  Writes the checksum file for `files` (paths), in rustler_precompiled's
  format: one `"name" => "sha256:<hex>"` line per file, sorted.
  """
  @spec write_checksums(Path.t(), [Path.t()]) :: :ok
  def write_checksums(path, files) do
    lines =
      files
      |> Enum.map(&{Path.basename(&1), checksum(File.read!(&1))})
      |> Enum.sort()
      |> Enum.map(fn {name, sum} -> ~s(  "#{name}" => "#{sum}",\n) end)

    File.write!(path, ["%{\n", lines, "}\n"])
  end

  @doc """
  Checks `data`, fetched from `source`, against the checksum listed for
  `name`. The error names the file, where it came from, and both sums.
  """
  @spec verify(String.t(), binary(), String.t(), String.t()) :: :ok | {:error, String.t()}
  def verify(name, data, expected, source) do
    actual = checksum(data)

    if actual == expected do
      :ok
    else
      {:error,
       "checksum mismatch for #{name} (from #{source}): expected #{expected}, got #{actual}. " <>
         "Nothing was installed. The artifact is not the one #{checksum_file_name()} " <>
         "lists: fetch it again from the release, or build from source with " <>
         "DRAB_PRESENCE_BUILD=1 (needs cargo)."}
    end
  end

  ## Fetching

  @doc """
  Reads `name` under `base_url`: a `file://` URL or a plain path is read
  from disk; `http://` and `https://` are downloaded with `:httpc`
  (certificates verified; `HTTP_PROXY`/`HTTPS_PROXY` honoured).
  """
  @spec fetch(String.t(), String.t()) :: {:ok, binary(), String.t()} | {:error, String.t()}
  def fetch(base_url, name) do
    url = String.trim_trailing(base_url, "/") <> "/" <> name

    case URI.parse(url) do
      %URI{scheme: scheme} when scheme in ["http", "https"] ->
        with {:ok, body} <- http_get(url), do: {:ok, body, url}

      %URI{scheme: "file", path: path} ->
        read_file(URI.decode(path || ""), url)

      %URI{scheme: nil} ->
        read_file(url, url)

      %URI{scheme: scheme} ->
        {:error, "unsupported URL scheme #{inspect(scheme)} in #{url}"}
    end
  end

  defp read_file(path, url) do
    case File.read(path) do
      {:ok, data} -> {:ok, data, url}
      {:error, reason} -> {:error, "cannot read #{url}: #{:file.format_error(reason)}"}
    end
  end

  defp http_get(url) do
    {:ok, _} = Application.ensure_all_started(:inets)
    {:ok, _} = Application.ensure_all_started(:ssl)
    set_proxy(:proxy, System.get_env("HTTP_PROXY") || System.get_env("http_proxy"))
    set_proxy(:https_proxy, System.get_env("HTTPS_PROXY") || System.get_env("https_proxy"))

    http_options = [timeout: 120_000, connect_timeout: 15_000] ++ ssl_options(url)

    case :httpc.request(:get, {String.to_charlist(url), []}, http_options, body_format: :binary) do
      {:ok, {{_, 200, _}, _headers, body}} -> {:ok, body}
      {:ok, {{_, status, _}, _headers, _body}} -> {:error, "GET #{url}: HTTP status #{status}"}
      {:error, reason} -> {:error, "GET #{url}: #{inspect(reason)}"}
    end
  end

  defp set_proxy(_key, nil), do: :ok

  defp set_proxy(key, proxy) do
    %URI{host: host, port: port} = URI.parse(proxy)
    :httpc.set_options([{key, {{String.to_charlist(host), port}, []}}])
  end

  defp ssl_options("https:" <> _) do
    [
      ssl:
        [
          verify: :verify_peer,
          depth: 3,
          customize_hostname_check: [
            match_fun: :public_key.pkix_verify_hostname_match_fun(:https)
          ]
        ] ++ cacerts()
    ]
  end

  defp ssl_options(_url), do: []

  # The OS's certificates: OTP 25 reads them itself; older OTPs get the
  # bundle SSL_CERT_FILE names, or the usual places.
  defp cacerts do
    file =
      Enum.find(
        [
          System.get_env("SSL_CERT_FILE"),
          "/etc/ssl/certs/ca-certificates.crt",
          "/etc/ssl/cert.pem"
        ],
        &(&1 && File.exists?(&1))
      )

    cond do
      function_exported?(:public_key, :cacerts_get, 0) -> [cacerts: :public_key.cacerts_get()]
      file -> [cacertfile: String.to_charlist(file)]
      true -> Mix.raise("no CA certificates found for https: set SSL_CERT_FILE")
    end
  end

  ## Tarballs

  @doc """
  A `.tar.gz` at `path` holding a copy of the file `source` as its one
  file, `member`, with `mode` (the sidecar's archive keeps it executable).
  """
  @spec tar(Path.t(), String.t(), Path.t(), non_neg_integer()) :: :ok
  def tar(path, member, source, mode) do
    staged = Path.join(Path.dirname(path), member)
    File.cp!(source, staged)
    File.chmod!(staged, mode)

    try do
      :ok =
        :erl_tar.create(
          String.to_charlist(path),
          [{String.to_charlist(member), String.to_charlist(staged)}],
          [:compressed]
        )
    after
      File.rm(staged)
    end
  end

  @doc "The one regular file of a `.tar.gz` artifact."
  @spec untar(binary(), String.t()) :: {:ok, binary()} | {:error, String.t()}
  def untar(data, name) do
    case :erl_tar.extract({:binary, data}, [:compressed, :memory]) do
      {:ok, [{_member, contents}]} -> {:ok, contents}
      {:ok, files} -> {:error, "#{name} holds #{length(files)} files, not one"}
      {:error, reason} -> {:error, "#{name} is not a readable .tar.gz: #{inspect(reason)}"}
    end
  end
end

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

defmodule Mix.Tasks.DrabPresence.Package do
  @shortdoc "Builds the precompiled artifacts of this machine's target"
  @moduledoc """
  Builds the NIF and the sidecar with cargo for one target (this
  machine's, or `CARGO_BUILD_TARGET`'s) and writes, into `--out` (default
  `dist/`), the artifacts a release publishes, named as
  `Mix.Tasks.Compile.PresenceNif` fetches them, and the checksum file of
  every artifact in that folder:

      mix drab_presence.package [--out DIR] [--checksums-only]

  `--checksums-only` builds nothing: it rewrites the checksum file over
  the artifacts already in the folder (after CI gathered every target's).
  `scripts/package --help` shows how CI builds the other targets.
  """
  use Mix.Task

  alias DrabPresence.Precompiled

  @impl Mix.Task
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: [out: :string, checksums_only: :boolean])
    out = Path.expand(opts[:out] || "dist")
    File.mkdir_p!(out)

    unless opts[:checksums_only], do: build(out)

    artifacts = Path.wildcard(Path.join(out, "*.tar.gz"))
    checksums = Path.join(out, Precompiled.checksum_file_name())
    Precompiled.write_checksums(checksums, artifacts)
    Mix.shell().info("Wrote #{checksums} (#{length(artifacts)} artifacts)")
  end

  defp build(out) do
    cargo = System.find_executable("cargo") || Mix.raise("cargo is not on PATH")
    version = Mix.Project.config()[:version]
    target = package_target(cargo)
    env = System.get_env()
    project_dir = File.cwd!()

    # No test hooks: what users get.
    args =
      ["build", "--package", "presence_nif", "--package", "presence_sidecar", "--release"] ++
        if env["CARGO_BUILD_TARGET"] in [nil, ""], do: [], else: ["--target", target]

    Mix.shell().info("cargo #{Enum.join(args, " ")}")

    case System.cmd(cargo, args,
           cd: project_dir,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> :ok
      {_, status} -> Mix.raise("cargo build failed with exit status #{status}")
    end

    dir = Mix.Tasks.Compile.PresenceNif.cargo_output_dir(env, project_dir, "release")
    nif = if target =~ "darwin", do: "libpresence_nif.dylib", else: "libpresence_nif.so"

    for {kind, built} <- [nif: nif, sidecar: "presence_sidecar"] do
      name = Precompiled.artifact_name(kind, version, target)
      path = Path.join(out, name)

      mode = if kind == :sidecar, do: 0o755, else: 0o644
      Precompiled.tar(path, String.replace_suffix(name, ".tar.gz", ""), Path.join(dir, built), mode)

      Mix.shell().info("Wrote #{path}")
    end
  end

  # What cargo builds for: the --target given, else rustc's host.
  defp package_target(cargo) do
    case System.get_env("CARGO_BUILD_TARGET") do
      target when is_binary(target) and target != "" ->
        target

      _ ->
        rustc = Path.join(Path.dirname(cargo), "rustc")
        rustc = if File.exists?(rustc), do: rustc, else: System.find_executable("rustc")
        {info, 0} = System.cmd(rustc, ["-vV"])
        [_, host] = Regex.run(~r/^host: (\S+)$/m, info)
        host
    end
  end
end
