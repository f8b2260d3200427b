defmodule Drab.Presence.PrecompiledTest do
  # The build-time side of precompiled artifacts (mix/precompiled.exs,
  # loaded with mix.exs): names, targets, NIF versions, checksums and
  # cargo's output directory. Where rustler_precompiled is on the code path
  # (built from its public source, ERL_LIBS), its own functions must agree
  # with ours on the names and the checksum file; otherwise those tests are
  # skipped with a message. The install itself, without cargo, is
  # scripts/test-install's (run by scripts/test).
  use ExUnit.Case, async: true

  alias DrabPresence.Precompiled

  @compile {:no_warn_undefined, [RustlerPrecompiled, RustlerPrecompiled.Config]}

  @version Mix.Project.config()[:version]

  # A directory of the test's own (ExUnit's :tmp_dir is Elixir 1.11+).
  setup do
    dir =
      Path.join(
        System.tmp_dir!(),
        "drab_presence_precompiled_#{System.unique_integer([:positive])}"
      )

    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, tmp_dir: dir}
  end

  test "artifact names, as a release publishes them" do
    assert Precompiled.artifact_name(:nif, "0.1.0", "x86_64-unknown-linux-gnu") ==
             "libpresence_nif-v0.1.0-nif-2.15-x86_64-unknown-linux-gnu.so.tar.gz"

    assert Precompiled.artifact_name(:sidecar, "0.1.0", "aarch64-apple-darwin") ==
             "presence_sidecar-v0.1.0-aarch64-apple-darwin.tar.gz"

    assert Precompiled.checksum_file_name() == "checksum-Elixir.Drab.Presence.Native.exs"
  end

  test "the NIF version of the artifacts is the one Cargo.toml builds" do
    cargo = File.read!("native/presence_nif/Cargo.toml")
    [major, minor] = Regex.run(~r/nif_version_(\d+)_(\d+)/, cargo, capture: :all_but_first)
    assert Precompiled.nif_versions() == ["#{major}.#{minor}"]
  end

  test "this VM's target, normalised as rustler_precompiled does" do
    assert Precompiled.normalize_target("x86_64-pc-linux-gnu") == "x86_64-unknown-linux-gnu"

    assert Precompiled.normalize_target("aarch64-unknown-linux-musl") ==
             "aarch64-unknown-linux-musl"

    assert Precompiled.normalize_target("x86_64-pc-linux-musl") == "x86_64-unknown-linux-musl"
    assert Precompiled.normalize_target("aarch64-apple-darwin23.4.0") == "aarch64-apple-darwin"
    assert Precompiled.normalize_target("arm-apple-darwin20.1.0") == "aarch64-apple-darwin"
    assert Precompiled.normalize_target("amd64-pc-linux-gnu") == "x86_64-unknown-linux-gnu"

    # CARGO_BUILD_TARGET, what cargo would build for, wins.
    env = %{"CARGO_BUILD_TARGET" => "aarch64-unknown-linux-musl"}
    assert Precompiled.target(env, "x86_64-pc-linux-gnu") == "aarch64-unknown-linux-musl"

    assert Precompiled.target(%{"CARGO_BUILD_TARGET" => ""}, "x86_64-pc-linux-gnu") ==
             "x86_64-unknown-linux-gnu"
  end

  test "the NIF version: the VM's own, else the newest older minor, none across majors" do
    assert Precompiled.nif_version("2.15", ["2.15"]) == {:ok, "2.15"}
    assert Precompiled.nif_version("2.17", ["2.15", "2.16"]) == {:ok, "2.16"}
    assert Precompiled.nif_version("2.14", ["2.15"]) == :error
    assert Precompiled.nif_version("3.0", ["2.15"]) == :error
  end

  test "cargo's output: CARGO_TARGET_DIR and CARGO_BUILD_TARGET respected" do
    output = &Mix.Tasks.Compile.PresenceNif.cargo_output_dir/3
    assert output.(%{}, "/p", "release") == "/p/target/release"
    assert output.(%{}, "/p", "dev") == "/p/target/debug"
    assert output.(%{"CARGO_TARGET_DIR" => "/t"}, "/p", "release") == "/t/release"
    assert output.(%{"CARGO_TARGET_DIR" => "out"}, "/p", "release") == "/p/out/release"

    env = %{"CARGO_TARGET_DIR" => "/t", "CARGO_BUILD_TARGET" => "x86_64-unknown-linux-musl"}
    assert output.(env, "/p", "release") == "/t/x86_64-unknown-linux-musl/release"
  end

  test "checksum file: written sorted, read back, a mismatch named with both sums", %{
    tmp_dir: dir
  } do
    a = Path.join(dir, "b.tar.gz")
    b = Path.join(dir, "a.tar.gz")
    File.write!(a, "one")
    File.write!(b, "two")
    path = Path.join(dir, Precompiled.checksum_file_name())
    Precompiled.write_checksums(path, [a, b])

    assert {:ok, sums} = Precompiled.read_checksums(path)
    assert Map.keys(sums) == ["a.tar.gz", "b.tar.gz"]

    assert sums["b.tar.gz"] ==
             "sha256:" <> Base.encode16(:crypto.hash(:sha256, "one"), case: :lower)

    assert File.read!(path) =~ ~r/\A%\{\n  "a.tar.gz" => "sha256:[0-9a-f]{64}",\n/

    assert :ok = Precompiled.verify("b.tar.gz", "one", sums["b.tar.gz"], "here")
    assert {:error, message} = Precompiled.verify("b.tar.gz", "0ne", sums["b.tar.gz"], "file:///x")
    assert message =~ "checksum mismatch for b.tar.gz (from file:///x)"
    assert message =~ "expected #{sums["b.tar.gz"]}, got sha256:"
    assert message =~ "Nothing was installed"

    assert Precompiled.read_checksums(Path.join(dir, "none.exs")) == :none
  end

  test "a tarball holds its one file, with its mode", %{tmp_dir: dir} do
    source = Path.join(dir, "bin")
    File.write!(source, "#!/bin/sh\n")
    tar = Path.join(dir, "presence_sidecar-v0-x.tar.gz")
    :ok = Precompiled.tar(tar, "presence_sidecar-v0-x", source, 0o755)
    assert Precompiled.untar(File.read!(tar), "t") == {:ok, "#!/bin/sh\n"}

    {:ok, [{_name, :regular, _size, _mtime, mode, _uid, _gid}]} =
      :erl_tar.table(String.to_charlist(tar), [:compressed, :verbose])

    assert Bitwise.band(mode, 0o777) == 0o755
    assert {:error, _} = Precompiled.untar("not a tarball", "t")
  end

  describe "against rustler_precompiled" do
    @describetag :rustler_precompiled

    test "it names this target's NIF artifact as we do" do
      config =
        RustlerPrecompiled.Config.new(
          otp_app: :drab_presence,
          module: Drab.Presence.Native,
          crate: "presence_nif",
          base_url: "file:///dist",
          version: @version,
          force_build: false,
          nif_versions: Precompiled.nif_versions(),
          targets: Precompiled.targets()
        )

      {:ok, metadata} = RustlerPrecompiled.build_metadata(config)

      {:ok, nif_version} = Precompiled.nif_version()
      ours = Precompiled.artifact_name(:nif, @version, Precompiled.target(%{}), nif_version)
      assert metadata.file_name == ours
      assert {:ok, "nif-" <> _} = RustlerPrecompiled.target()

      # Every release target is one rustler_precompiled knows.
      assert Precompiled.targets() -- RustlerPrecompiled.Config.available_targets() == []
    end

    test "it accepts our checksum file, and refuses a damaged artifact", %{tmp_dir: dir} do
      name = Precompiled.artifact_name(:nif, @version, "x86_64-unknown-linux-gnu")
      artifact = Path.join(dir, name)
      File.write!(artifact, "the artifact")
      path = Path.join(dir, Precompiled.checksum_file_name())
      Precompiled.write_checksums(path, [artifact])
      {sums, _} = Code.eval_file(path)

      assert RustlerPrecompiled.check_integrity_from_map(sums, artifact, Drab.Presence.Native) ==
               :ok

      File.write!(artifact, "the artefact")

      assert {:error, _} =
               RustlerPrecompiled.check_integrity_from_map(sums, artifact, Drab.Presence.Native)
    end
  end
end
