# The native half of drab_presence at build time, part 1: the names,
# targets and checksums of precompiled artifacts, shared by the mix
# compiler (mix/compile.presence_nif.exs) and the packaging task
# (mix/drab_presence.package.exs). Required by mix.exs, so it runs in the mix
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
