# Lists the import cycles among the modules of each Rust crate in native/:
# a module uses another when it names it (`crate::other`, or `super::other`
# from a child module). Modules that use each other, directly or through
# others, form a cycle. Prints each cycle and exits 1 if there is any.
#
#   elixir scripts/module_cycles.exs [crate_dir ...]    (default: native/*)
#
# Elixir's own: `mix xref graph --format cycles --label compile-connected`.

defmodule ModuleCycles do
  def run(crates) do
    results = for crate <- crates, do: {crate, cycles(crate)}

    for {crate, cycles} <- results do
      IO.puts("#{crate}: #{length(cycles)} cycle(s)")
      for cycle <- cycles, do: IO.puts("  " <> Enum.join(cycle, " <-> "))
    end

    if Enum.any?(results, fn {_, cycles} -> cycles != [] end), do: System.halt(1)
  end

  def cycles(crate) do
    src = Path.join(crate, "src")
    files = Path.wildcard(Path.join(src, "**/*.rs"))
    modules = Map.new(files, &{module_name(src, &1), &1})

    graph =
      Map.new(modules, fn {module, file} ->
        {module, uses(File.read!(file), module, Map.keys(modules))}
      end)

    graph
    |> strongly_connected()
    |> Enum.filter(&(length(&1) > 1))
    |> Enum.map(&Enum.sort/1)
    |> Enum.sort()
  end

  # `store/replication.rs` is module `store::replication`; `lib.rs` and
  # `main.rs` are the crate root, which names every module and uses none.
  defp module_name(src, file) do
    file
    |> Path.relative_to(src)
    |> Path.rootname()
    |> String.replace("/", "::")
    |> case do
      root when root in ["lib", "main"] -> "crate"
      name -> name
    end
  end

  # Modules named in code (comments and doc links dropped).
  defp uses(_text, "crate", _modules), do: []

  defp uses(text, module, modules) do
    code =
      text
      |> String.split("\n")
      |> Enum.map(&String.replace(&1, ~r{//.*$}, ""))
      |> Enum.join("\n")

    parent = module |> String.split("::") |> Enum.drop(-1) |> Enum.join("::")

    named =
      Regex.scan(~r/\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)/, code)
      |> Enum.map(fn [_, path] -> path end)

    from_super =
      Regex.scan(~r/\bsuper::([a-z_][a-z0-9_]*)/, code)
      |> Enum.map(fn [_, name] -> if parent == "", do: name, else: parent <> "::" <> name end)

    # A `super::x` use in a root-level module is a use of the crate root.
    supers = if Regex.match?(~r/\bsuper::[A-Z{]/, code) and parent != "", do: [parent], else: []

    (named ++ from_super ++ supers)
    |> Enum.map(&longest_module(&1, modules))
    |> Enum.reject(&(&1 in [nil, module]))
    |> Enum.uniq()
  end

  defp longest_module(path, modules) do
    parts = String.split(path, "::")

    Enum.find_value(length(parts)..1, fn n ->
      candidate = parts |> Enum.take(n) |> Enum.join("::")
      if candidate in modules, do: candidate
    end)
  end

  # Tarjan's algorithm, over a map of module => [used module].
  defp strongly_connected(graph) do
    state = %{index: 0, stack: [], on_stack: MapSet.new(), indices: %{}, lows: %{}, sccs: []}

    graph
    |> Map.keys()
    |> Enum.reduce(state, fn v, state ->
      if Map.has_key?(state.indices, v), do: state, else: connect(v, graph, state)
    end)
    |> Map.fetch!(:sccs)
  end

  defp connect(v, graph, state) do
    state = %{
      state
      | indices: Map.put(state.indices, v, state.index),
        lows: Map.put(state.lows, v, state.index),
        index: state.index + 1,
        stack: [v | state.stack],
        on_stack: MapSet.put(state.on_stack, v)
    }

    state =
      Enum.reduce(Map.get(graph, v, []), state, fn w, state ->
        cond do
          not Map.has_key?(state.indices, w) ->
            state = connect(w, graph, state)
            %{state | lows: Map.update!(state.lows, v, &min(&1, state.lows[w]))}

          MapSet.member?(state.on_stack, w) ->
            %{state | lows: Map.update!(state.lows, v, &min(&1, state.indices[w]))}

          true ->
            state
        end
      end)

    if state.lows[v] == state.indices[v] do
      {scc, rest} = Enum.split_while(state.stack, &(&1 != v))
      scc = [v | scc]

      %{
        state
        | stack: tl(rest),
          on_stack: Enum.reduce(scc, state.on_stack, &MapSet.delete(&2, &1)),
          sccs: [scc | state.sccs]
      }
    else
      state
    end
  end
end

crates =
  case System.argv() do
    [] -> Path.wildcard(Path.join(Path.dirname(__DIR__), "native/*")) |> Enum.filter(&File.dir?/1)
    dirs -> dirs
  end

ModuleCycles.run(crates)
