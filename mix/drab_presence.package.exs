# `mix drab_presence.package`: packages the built NIF and sidecar as
# release artifacts with their checksum file (mix/precompiled.exs names
# them). Required by mix.exs, after mix/precompiled.exs; not part of the
# library.

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
