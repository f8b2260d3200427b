# Keeps the library (elixir/) on the APIs of the oldest versions it
# supports, Elixir 1.10 and Erlang/OTP 22, while everything else runs on a
# newer toolchain. scripts/test runs it after `mix compile`:
#
#   mix run --no-start --no-compile scripts/check_api.exs
#
# It compiles elixir/**/*.ex, and a module that does `use Drab.Presence`,
# again in memory with a compiler tracer, and looks up every remote or
# imported function and macro, and every module named, of Elixir's elixir
# and logger apps and OTP's erts, kernel and stdlib in
# scripts/api_baseline.txt. Anything missing there fails the check, with
# file and line. Only calls written in elixir/ count, not the code Elixir's
# own macros expand to. Calls into other modules (our own, Phoenix) are not
# checked; nor are apply/3 and other calls made by name at run time.
#
# Then it looks for syntax newer than Elixir 1.10 (stepped ranges,
# expressions as bitstring sizes, map.field in guards, ...; see
# scripts/floor_syntax.exs) in every file the oldest toolchain compiles or
# runs: elixir/, test/, mix.exs and the demo; and for Kernel functions and
# macros missing from the baseline called there without a module (then/2,
# dbg/1). All in about two seconds.
#
# The baseline lists the exports of Elixir 1.10.3 (elixir, logger) and of
# Erlang/OTP 22.3.4.19 (erts, kernel, stdlib): the oldest line the whole
# suite has passed on (README, "Supported versions"). Remade, with that
# Elixir and OTP first on PATH, by:
#
#   elixir scripts/check_api.exs --generate > scripts/api_baseline.txt

Code.require_file("floor_syntax.exs", __DIR__)

defmodule DrabPresence.ApiCheck do
  alias DrabPresence.FloorSyntax

  @baseline Path.expand("api_baseline.txt", __DIR__)
  @elixir_apps [:elixir, :logger]
  @erlang_apps [:erts, :kernel, :stdlib]
  @oldest "Elixir 1.10 / OTP 22"

  ## Check

  def check do
    baseline = read_baseline()
    :ets.new(__MODULE__, [:named_table, :public, :bag])

    tmp =
      Path.join(System.tmp_dir!(), "drab_presence_api_check_#{System.unique_integer([:positive])}")

    sample = Path.join(tmp, "use_drab_presence.ex")
    File.mkdir_p!(tmp)

    File.write!(sample, """
    defmodule DrabPresence.ApiCheck.Sample do
      use Drab.Presence, otp_app: :drab_presence
    end
    """)

    # Our modules are loaded already (mix run): compiling them again only
    # replaces them with the same code.
    Code.compiler_options(ignore_module_conflict: true)
    Code.put_compiler_option(:tracers, [__MODULE__])
    # Columns tell a call written in our source from one that a macro of
    # Elixir's generated (no column): only the first kind is ours to check.
    Code.put_compiler_option(:parser_options, columns: true)

    try do
      files = Path.wildcard("elixir/**/*.ex") ++ [sample]
      {:ok, _, _} = Kernel.ParallelCompiler.compile(files)
    after
      Code.put_compiler_option(:tracers, [])
      Code.put_compiler_option(:parser_options, [])
      File.rm_rf!(tmp)
    end

    problems =
      :ets.tab2list(__MODULE__)
      |> Enum.filter(&written?/1)
      |> Enum.sort()
      |> Enum.flat_map(fn {file, line, ref} -> problem(baseline, ref, where(file, line)) end)
      |> Enum.uniq()

    problems = problems ++ FloorSyntax.check_files(floor_files(), newer_kernel(baseline))

    case problems do
      [] ->
        IO.puts(
          "API check: elixir/ calls only what #{@oldest} have, and no file that runs there " <>
            "uses newer syntax"
        )

      _ ->
        Enum.each(problems, &IO.puts(:stderr, &1))

        IO.puts(:stderr, """

        API check failed: code that runs on #{@oldest} uses what they lack
        (scripts/api_baseline.txt, scripts/floor_syntax.exs). Use an older API
        or syntax, or call the newer API only where it exists
        (Code.ensure_loaded?/1, function_exported?/3).\
        """)

        System.halt(1)
    end
  end

  # What the oldest toolchain compiles or runs: the library, the tests
  # (scripts/test-with runs them there), mix.exs and the demo.
  defp floor_files do
    Path.wildcard("elixir/**/*.ex") ++
      Path.wildcard("test/**/*.{ex,exs}") ++ ["mix.exs", "scripts/demo.exs"]
  end

  # Kernel's functions and macros that the baseline's Kernel (and special
  # forms) lack.
  defp newer_kernel(baseline) do
    floor = MapSet.union(baseline[Kernel], baseline[Kernel.SpecialForms])
    MapSet.new(exports(Kernel) -- MapSet.to_list(floor))
  end

  @doc false
  def trace({kind, meta, module, name, arity}, env)
      when kind in [:remote_function, :remote_macro, :imported_function, :imported_macro] do
    record(env, meta, {module, name, arity})
  end

  def trace({:alias_reference, meta, module}, env), do: record(env, meta, module)
  def trace(_event, _env), do: :ok

  # Ours: written in elixir/ (a column), or in a `quote location: :keep`
  # of elixir/ that `use` injected (a file).
  defp record(env, meta, ref) do
    file = meta[:file] || env.file

    if (meta[:column] || meta[:file]) && String.starts_with?(file, File.cwd!() <> "/elixir/"),
      do: :ets.insert(__MODULE__, {file, meta[:line] || env.line, ref})

    :ok
  end

  # Elixir reports a call it inlines as the Erlang call it becomes:
  # `Atom.to_string(a)` as :erlang.atom_to_binary/1 (OTP 23) on Elixir 1.14.
  # Only an Erlang call that the source spells out is ours.
  defp written?({file, line, {module, _name, _arity}}) when is_atom(module) do
    case Atom.to_string(module) do
      "Elixir." <> _ -> true
      erlang -> file |> File.stream!() |> Enum.at(line - 1, "") |> String.contains?(":#{erlang}.")
    end
  end

  defp written?(_alias_reference), do: true

  defp where(file, line), do: "#{Path.relative_to_cwd(file)}:#{line}"

  defp problem(baseline, {module, name, arity}, where) do
    cond do
      not checked?(module) ->
        []

      not Map.has_key?(baseline, module) ->
        ["#{where}: #{show(module, name, arity)}: no module #{inspect(module)} in #{@oldest}"]

      not MapSet.member?(baseline[module], {name, arity}) ->
        ["#{where}: #{show(module, name, arity)} is not in #{@oldest}"]

      true ->
        []
    end
  end

  defp problem(baseline, module, where) do
    if checked?(module) and not Map.has_key?(baseline, module),
      do: ["#{where}: no module #{inspect(module)} in #{@oldest}"],
      else: []
  end

  defp show(module, name, arity), do: "#{inspect(module)}.#{name}/#{arity}"

  # Modules of the apps the baseline covers, as this (newer) VM sees them.
  defp checked?(module) do
    case :code.which(module) do
      :preloaded -> true
      path when is_list(path) -> app_of(path) in (@elixir_apps ++ @erlang_apps)
      _ -> false
    end
  end

  defp app_of(path) do
    case path |> List.to_string() |> Path.split() |> Enum.reverse() do
      [_beam, "ebin", app_dir | _] -> app_dir |> String.split("-") |> hd() |> String.to_atom()
      _ -> nil
    end
  end

  defp read_baseline do
    for line <- File.stream!(@baseline),
        line = String.trim(line),
        line != "" and not String.starts_with?(line, "#"),
        into: %{} do
      [module | functions] = String.split(line, " ")

      {String.to_atom(module),
       MapSet.new(functions, fn f ->
         {name, "/" <> arity} = String.split_at(f, elem(:binary.match(f, "/", scope: scope(f)), 0))
         {String.to_atom(name), String.to_integer(arity)}
       end)}
    end
  end

  # The last "/" splits name from arity: `//2` is the function `/`.
  defp scope(f) do
    {pos, _} = :binary.matches(f, "/") |> List.last()
    {pos, byte_size(f) - pos}
  end

  ## Generate

  def generate do
    IO.puts(
      "# Exports of Elixir #{System.version()} (elixir, logger) and Erlang/OTP " <>
        "#{otp_version()} (erts, kernel, stdlib)."
    )

    IO.puts("# Made by scripts/check_api.exs --generate; see there.")

    for app <- @elixir_apps ++ @erlang_apps,
        Application.load(app) in [:ok, {:error, {:already_loaded, app}}],
        {:ok, modules} = :application.get_key(app, :modules),
        module <- Enum.sort(modules ++ preloaded(app)),
        Code.ensure_loaded?(module) do
      functions = Enum.map_join(exports(module), " ", fn {name, arity} -> "#{name}/#{arity}" end)
      IO.puts("#{module} #{functions}")
    end
  end

  defp preloaded(:erts), do: :erlang.pre_loaded()
  defp preloaded(_app), do: []

  defp exports(module) do
    functions =
      if function_exported?(module, :__info__, 1),
        do: module.__info__(:functions) ++ module.__info__(:macros),
        else: module.module_info(:exports)

    functions |> Enum.reject(&(&1 in [module_info: 0, module_info: 1])) |> Enum.sort()
  end

  defp otp_version do
    [:code.root_dir(), "releases", System.otp_release(), "OTP_VERSION"]
    |> Path.join()
    |> File.read!()
    |> String.trim()
  end
end

case System.argv() do
  ["--generate"] -> DrabPresence.ApiCheck.generate()
  [] -> DrabPresence.ApiCheck.check()
end
