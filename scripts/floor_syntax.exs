# Syntax newer than Elixir 1.10, found by walking the AST of each file that
# the oldest supported toolchain compiles or runs: the library, the tests,
# mix.exs and the demo. scripts/check_api.exs runs it after its call check;
# test/drab/presence/floor_syntax_test.exs proves that each construct below
# fails it. Defines a module only: requiring this file runs nothing.
#
# What Elixir added after 1.10 that compiles on newer Elixir and not on
# 1.10 (their CHANGELOGs, "Enhancements"), and what this looks for:
#
#   1.11  map.field in guards; the +++ and --- operators; float-16 segments;
#         is_struct/2, is_exception/1,2 guards (Kernel calls, below)
#   1.12  stepped ranges first..last//step; then/2, tap/2
#   1.13  the ** operator; digits as sigil modifiers; import only: :sigils
#   1.14  an expression as a bitstring size (binary-size(n * 8)), in a
#         pattern or a construction; composite map keys with pins in a pattern;
#         nullary `..`; dbg, binary_slice
#   1.15  multi-letter uppercase sigils (~HTML"...")
#   1.16  size inferred for a binary segment that is not the last of a
#         pattern (<<^prefix::binary, rest::binary>>)
#   1.17  integers in uppercase sigils; is_non_struct_map/1, to_timeout/1
#
# Kernel functions and macros called without a module (then/2, dbg/1, ...)
# are checked against the baseline of Elixir 1.10's Kernel that the caller
# passes in: the call check covers remote calls in elixir/ only, and the
# tests are not compiled with its tracer. What this Elixir cannot parse at
# all is reported as such: newer syntax too, for an older floor.

defmodule DrabPresence.FloorSyntax do
  @floor "Elixir 1.10"
  @definitions [:def, :defp, :defmacro, :defmacrop, :defguard, :defguardp]
  @binary_types [:binary, :bits, :bitstring, :bytes]
  # Atoms that Elixir 1.10 cannot read as written (the formatter unquotes
  # :"**"), and this file runs there too.
  @power String.to_atom("**")
  @list_operators [String.to_atom("+++"), String.to_atom("---")]

  @doc "Problems (\"file:line: what\") in `files`, with `newer_kernel` as in check_string/3."
  def check_files(files, newer_kernel) do
    Enum.flat_map(files, &check_string(File.read!(&1), Path.relative_to_cwd(&1), newer_kernel))
  end

  @doc """
  Problems in `source`. `newer_kernel` is a set of `{name, arity}` of
  Kernel that #{@floor} lacks: a local call to one of them is a problem
  unless the source defines a function of that name.
  """
  def check_string(source, file, newer_kernel) do
    case Code.string_to_quoted(source, columns: true, file: file) do
      {:ok, ast} ->
        defined = defined_names(ast)

        newer =
          for {name, arity} <- newer_kernel,
              name not in defined,
              into: MapSet.new(),
              do: {name, arity}

        ast
        |> walk(:expr, {newer, []})
        |> elem(1)
        |> Enum.reverse()
        |> Enum.uniq()
        |> Enum.map(fn {line, what} -> "#{file}:#{line}: #{what}" end)

      {:error, {meta, message, token}} ->
        line = if is_list(meta), do: meta[:line], else: meta

        [
          "#{file}:#{line}: does not parse on Elixir #{System.version()} (#{inspect({message, token})})"
        ]
    end
  end

  defp defined_names(ast) do
    {_, names} =
      Macro.prewalk(ast, MapSet.new(), fn
        {definition, _, [head | _]} = node, names when definition in @definitions ->
          {node, MapSet.put(names, head_name(head))}

        node, names ->
          {node, names}
      end)

    names
  end

  defp head_name({:when, _, [call | _]}), do: head_name(call)
  defp head_name({name, _, _}) when is_atom(name), do: name
  defp head_name(_), do: nil

  ## The walk: `ctx` is :expr, :pattern, :guard, or :conditions (the
  ## clauses of a cond, which are expressions).

  # Definitions: arguments are patterns, a `when` a guard.
  defp walk({definition, _, [head | body]}, _ctx, acc) when definition in @definitions do
    acc =
      case head do
        {:when, _, [call, guard]} -> acc |> head(call) |> scan(guard, :guard)
        call -> head(acc, call)
      end

    walk(body, :expr, acc)
  end

  # Clauses of case, receive, fn, try, with's else: patterns, then a guard.
  defp walk({:->, _, [args, body]}, ctx, acc) when is_list(args) do
    acc =
      case args do
        [{:when, _, when_args}] ->
          {patterns, [guard]} = Enum.split(when_args, -1)
          acc |> scan(patterns, :pattern) |> scan(guard, :guard)

        _ ->
          scan(acc, args, if(ctx == :conditions, do: :expr, else: :pattern))
      end

    walk(body, :expr, acc)
  end

  # cond's clauses are conditions, not patterns.
  defp walk({:cond, _, [[do: clauses]]}, _ctx, acc) when is_list(clauses),
    do: walk(clauses, :conditions, acc)

  # Generators and with: a pattern (maybe guarded) on the left.
  defp walk({:<-, _, [left, right]}, ctx, acc) when ctx in [:expr, :conditions] do
    acc =
      case left do
        {:when, _, [pattern, guard]} -> acc |> scan(pattern, :pattern) |> scan(guard, :guard)
        pattern -> scan(acc, pattern, :pattern)
      end

    walk(right, :expr, acc)
  end

  defp walk({:=, _, [left, right]}, ctx, acc) when ctx in [:expr, :conditions],
    do: acc |> scan(left, :pattern) |> scan(right, :expr)

  defp walk({:^, _, [pinned]}, :pattern, acc), do: walk(pinned, :expr, acc)

  defp walk({:<<>>, _meta, segments} = node, ctx, acc) when is_list(segments) do
    acc = check_bitstring(acc, segments, ctx)
    generic(node, ctx, acc)
  end

  defp walk({:%{}, meta, pairs} = node, :pattern, acc) when is_list(pairs) do
    acc =
      if Enum.any?(pairs, &pinned_composite_key?/1),
        do: problem(acc, meta, "a composite map key with pins in a pattern (Elixir 1.14+)"),
        else: acc

    generic(node, :pattern, acc)
  end

  defp walk({:"..//", meta, [_, _, _]} = node, ctx, acc),
    do: generic(node, ctx, problem(acc, meta, "a stepped range first..last//step (Elixir 1.12+)"))

  defp walk({:.., meta, []}, _ctx, acc),
    do: problem(acc, meta, "`..` as a nullary operator (Elixir 1.14+)")

  defp walk({@power, meta, [_, _]} = node, ctx, acc),
    do: generic(node, ctx, problem(acc, meta, "the ** operator (Elixir 1.13+)"))

  defp walk({op, meta, [_, _]} = node, ctx, acc) when op in @list_operators,
    do: generic(node, ctx, problem(acc, meta, "the #{op} operator (Elixir 1.11+)"))

  defp walk({:import, meta, [_, opts]} = node, ctx, acc) when is_list(opts) do
    acc =
      if Keyword.keyword?(opts) and opts[:only] == :sigils,
        do: problem(acc, meta, "import only: :sigils (Elixir 1.13+)"),
        else: acc

    generic(node, ctx, acc)
  end

  defp walk({name, meta, [{:<<>>, _, _}, modifiers]} = node, ctx, acc)
       when is_atom(name) and is_list(modifiers) do
    acc =
      case Atom.to_string(name) do
        "sigil_" <> letters when byte_size(letters) > 1 ->
          problem(acc, meta, "a multi-letter sigil ~#{letters} (Elixir 1.15+)")

        "sigil_" <> letters ->
          if Enum.any?(modifiers, &(&1 in ?0..?9)),
            do: problem(acc, meta, "digits as modifiers of ~#{letters} (Elixir 1.13+)"),
            else: acc

        _ ->
          acc
      end

    generic(node, ctx, local_call(node, acc))
  end

  # map.field (or any call on an expression) in a guard.
  defp walk({{:., _, [left, field]}, meta, []} = node, :guard, acc)
       when is_atom(field) and not is_atom(left) do
    acc =
      if match?({:__aliases__, _, _}, left),
        do: acc,
        else: problem(acc, meta, "map.field in a guard (Elixir 1.11+)")

    generic(node, :guard, acc)
  end

  # x |> f(y) calls f/2.
  defp walk({:|>, _, [left, {name, meta, args} = right]}, ctx, acc)
       when is_atom(name) and is_list(args) do
    acc = local_call({name, meta, [left | args]}, acc)
    acc |> scan(left, ctx) |> scan(right, ctx)
  end

  defp walk({name, _, args} = node, ctx, acc) when is_atom(name) and is_list(args),
    do: generic(node, ctx, local_call(node, acc))

  defp walk(node, ctx, acc), do: generic(node, ctx, acc)

  # Same context into every part of a node.
  defp generic({form, _meta, args}, ctx, acc) when is_list(args) do
    acc = if is_atom(form), do: acc, else: walk(form, ctx, acc)
    walk(args, ctx, acc)
  end

  defp generic({left, right}, ctx, acc), do: acc |> scan(left, ctx) |> scan(right, ctx)
  defp generic(list, ctx, acc) when is_list(list), do: Enum.reduce(list, acc, &walk(&1, ctx, &2))
  defp generic(_leaf, _ctx, acc), do: acc

  # walk/3 with the accumulator first, for pipes.
  defp scan(acc, ast, ctx), do: walk(ast, ctx, acc)

  # def a +++ b defines the operator.
  defp head(acc, {op, meta, [_, _] = args}) when op in @list_operators,
    do: acc |> problem(meta, "the #{op} operator (Elixir 1.11+)") |> scan(args, :pattern)

  defp head(acc, {_name, _, args}) when is_list(args), do: scan(acc, args, :pattern)
  defp head(acc, _head), do: acc

  defp local_call({name, meta, args}, {newer, _} = acc) do
    if MapSet.member?(newer, {name, length(args)}),
      do: problem(acc, meta, "Kernel.#{name}/#{length(args)}, which #{@floor} lacks"),
      else: acc
  end

  ## Bitstrings

  defp check_bitstring(acc, segments, ctx) do
    last = length(segments) - 1

    segments
    |> Enum.with_index()
    |> Enum.reduce(acc, fn
      {{:"::", meta, [value, spec]}, index}, acc ->
        {types, sizes} = spec_parts(spec, {[], []})

        acc
        |> check_sizes(meta, sizes)
        |> check_float16(meta, types, sizes)
        |> check_inferred_size(meta, ctx == :pattern and index < last, value, types, sizes)

      _segment, acc ->
        acc
    end)
  end

  # 1.10 refuses an expression as a size, in a pattern and in a
  # construction alike ("size in bitstring expects an integer or a
  # variable as argument").
  defp check_sizes(acc, meta, sizes) do
    if Enum.all?(sizes, &floor_size?/1),
      do: acc,
      else: problem(acc, meta, "an expression as a bitstring size (Elixir 1.14+)")
  end

  defp check_float16(acc, meta, types, sizes) do
    if :float in types and 16 in sizes,
      do: problem(acc, meta, "a float-16 segment (Elixir 1.11+)"),
      else: acc
  end

  defp check_inferred_size(acc, meta, before_last?, value, types, sizes) do
    if before_last? and sizes == [] and Enum.any?(types, &(&1 in @binary_types)) and
         not is_binary(value),
       do: problem(acc, meta, "a binary segment without a size before the last (Elixir 1.16+)"),
       else: acc
  end

  # Types and size expressions of a segment's spec: `binary-size(n)`,
  # `size(8)-unit(4)`, `8`, `8*4` (size times unit), `integer`, ...
  defp spec_parts({:-, _, [left, right]}, parts), do: spec_parts(right, spec_parts(left, parts))
  defp spec_parts({:size, _, [size]}, {types, sizes}), do: {types, [size | sizes]}
  defp spec_parts({:*, _, [size, _unit]}, {types, sizes}), do: {types, [size | sizes]}
  defp spec_parts(size, {types, sizes}) when is_integer(size), do: {types, [size | sizes]}

  defp spec_parts({type, _, ctx}, {types, sizes}) when is_atom(type) and is_atom(ctx),
    do: {[type | types], sizes}

  defp spec_parts(_other, parts), do: parts

  # What 1.10 takes as a size: a literal, a variable (pinned or not), a
  # module attribute.
  defp floor_size?(size) when is_integer(size), do: true
  defp floor_size?({name, _, ctx}) when is_atom(name) and is_atom(ctx), do: true
  defp floor_size?({:^, _, [{name, _, ctx}]}) when is_atom(name) and is_atom(ctx), do: true
  defp floor_size?({:@, _, [{name, _, ctx}]}) when is_atom(name) and is_atom(ctx), do: true
  defp floor_size?(_expression), do: false

  defp pinned_composite_key?({key, _value}) do
    composite? =
      is_list(key) or match?({:{}, _, _}, key) or (is_tuple(key) and tuple_size(key) == 2)

    composite? and has_pin?(key)
  end

  defp pinned_composite_key?(_), do: false

  defp has_pin?(ast) do
    {_, found} =
      Macro.prewalk(ast, false, fn node, found -> {node, found or match?({:^, _, _}, node)} end)

    found
  end

  defp problem({newer, problems}, meta, what), do: {newer, [{meta[:line], what} | problems]}
end
