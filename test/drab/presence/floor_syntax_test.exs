defmodule Drab.Presence.FloorSyntaxTest do
  # scripts/floor_syntax.exs, which scripts/check_api.exs runs: each
  # construct newer than Elixir 1.10 fails it, and what 1.10 compiles passes.
  # The fixtures are module bodies, and the suite compiles them too, on
  # whatever Elixir runs it (scripts/test-with runs it on each supported
  # one): below the version a construct is listed for, it must not compile,
  # and every floor fixture must compile everywhere. So the list is checked
  # against the real compilers, not against our reading of their changelogs.
  use ExUnit.Case, async: true

  import ExUnit.CaptureIO

  Code.require_file("../../../scripts/floor_syntax.exs", __DIR__)
  alias DrabPresence.FloorSyntax

  @newer_kernel MapSet.new(then: 2, tap: 2, dbg: 1, is_struct: 2, binary_slice: 3)

  # {construct, the Elixir that brought it, module body, what the check says}
  @newer [
    {"stepped range", "1.12.0", "def f(n), do: Enum.to_list(1..n//2)", "stepped range"},
    {"stepped range in a pattern", "1.12.0", "def f(1..2//1), do: :ok", "stepped range"},
    {"nullary ..", "1.14.0", "def f(list), do: Enum.slice(list, ..)", "nullary"},
    {"** operator", "1.13.0", "def f(x), do: x ** 2", "** operator"},
    {"+++ operator", "1.11.0", "def a +++ b, do: a ++ b", "+++ operator"},
    {"--- operator", "1.11.0", "def a --- b, do: a -- b", "--- operator"},
    {"multi-letter sigil", "1.15.0", ~S|def sigil_HTML(s, _), do: s
      def f, do: ~HTML"<p>"|, "multi-letter sigil"},
    {"digits as sigil modifiers", "1.13.0", "def sigil_x(s, m), do: {s, m}\ndef f, do: ~x/a/1",
     "digits as modifiers"},
    {"import only: :sigils", "1.13.0", "def f do\nimport Kernel, only: :sigils\n~w(a)\nend",
     "only: :sigils"},
    {"size expression in a function head", "1.14.0",
     "def f(<<n::32, refs::binary-size(n * 8)>>), do: refs", "bitstring size"},
    {"size expression in a construction", "1.14.0", "def f(n, x), do: <<x::size(n * 8)>>",
     "bitstring size"},
    {"size expression in a match", "1.14.0",
     "def f(bin) do\n<<n::8, b::size(n - 1)>> = bin\nb\nend", "bitstring size"},
    {"size expression in a case clause", "1.14.0",
     "def f(bin) do\ncase bin do\n<<n::8, b::binary-size(div(n, 2))>> -> b\nend\nend",
     "bitstring size"},
    {"size expression in fn", "1.14.0", "def f, do: fn <<n::8, b::bits-size(n * 2)>> -> b end",
     "bitstring size"},
    {"size expression in a generator", "1.14.0",
     "def f(bins), do: for(<<n::8, b::binary-size(n + 1)>> <- bins, do: b)", "bitstring size"},
    {"inferred size before the last segment", "1.16.0",
     "def f(prefix, bin) do\ncase bin do\n<<^prefix::binary, rest::binary>> -> rest\nend\nend",
     "without a size"},
    {"composite map key with pins", "1.14.0",
     "def f(a, m) do\ncase m do\n%{{^a, :b} => v} -> v\nend\nend", "composite map key"},
    {"map.field in a def guard", "1.11.0", "def f(m) when m.x > 1, do: m", "map.field in a guard"},
    {"map.field in a case guard", "1.11.0",
     "def f(r, old) do\ncase r do\n{:ok, same} when same == old.phx_ref -> :same\nend\nend",
     "map.field in a guard"},
    {"map.field in a with guard", "1.11.0", "def f(x) do\nwith {:ok, m} when m.ok <- x, do: m\nend",
     "map.field in a guard"},
    {"map.field in defguard", "1.11.0", "defguard is_big(m) when m.size > 10",
     "map.field in a guard"},
    {"nested map.field in a guard", "1.11.0", "def f(m) when m.a.b, do: m", "map.field in a guard"},
    {"then/2", "1.12.0", "def f(x), do: x |> then(&(&1 + 1))", "Kernel.then/2"},
    {"tap/2", "1.12.0", "def f(x), do: tap(x, &IO.inspect/1)", "Kernel.tap/2"},
    {"tap/2 in a pipe", "1.12.0", "def f(x), do: x |> Enum.map(& &1) |> tap(&IO.inspect/1)",
     "Kernel.tap/2"},
    {"dbg/1", "1.14.0", "def f(x), do: dbg(x)", "Kernel.dbg/1"},
    {"is_struct/2 in a guard", "1.11.0", "def f(s) when is_struct(s, URI), do: s",
     "Kernel.is_struct/2"}
  ]

  # What Elixir 1.10 compiles: none of it may fail the check.
  @floor [
    "def f, do: Enum.to_list(1..10)",
    "def f(x) when is_map_key(x, :a) and map_size(x) > 1, do: :erlang.map_get(:a, x)",
    "def f(<<n::32, refs::binary>>) when byte_size(refs) == n * 8, do: refs",
    "def f(<<n::32, refs::binary-size(n), rest::binary>>), do: {refs, rest}",
    "@size 4\ndef f(<<header::binary-size(@size), _::bits>>), do: header",
    "def f(n, x), do: <<x::size(n)-unit(8), x::8*4>>",
    ~S|def f(<<"prefix", rest::binary>>), do: rest|,
    "def f(tag, bin) do\ncase bin do\n<<n::8, ^tag::binary-size(n), r::binary>> -> r\nend\nend",
    "def f(key, m) do\ncase m do\n%{^key => v, :a => 1} -> v\nend\nend",
    "def f(m) do\ncond do\nm.x > 1 -> :big\ntrue -> :small\nend\nend",
    "def f(m) when :erlang.map_get(:x, m) > 1, do: m.x",
    "def f, do: {~r/x/i, ~w(a b)a}",
    ~S|def f(bin), do: for(<<c <- bin>>, c in ?a..?z, into: "", do: <<c>>)|,
    "def f(map), do: %{map | a: 1}.a",
    "def f(a), do: quote(do: unquote(a) + 2)",
    "def f(x), do: x |> tap_it() |> Enum.map(& &1)\ndef tap_it(x), do: x"
  ]

  for {construct, since, source, said} <- @newer do
    test "fails on #{construct} (Elixir #{since})" do
      source = unquote(source)
      older? = Version.compare(System.version(), unquote(since)) == :lt

      # Refused below its version; compiled from it on (so the fixture
      # itself is sound).
      assert compiles?(source) != older?,
             "#{if older?, do: "compiles", else: "does not compile"} on Elixir " <>
               "#{System.version()}, listed as #{unquote(since)}+: #{source}"

      # The check reads what the Elixir running it parses: from 1.14 on
      # (Debian's, which scripts/test runs it on), every construct here
      # parses into what it looks for, or fails to parse. An older parser
      # reads some of them as something else (1..n//2 as 1..n / (/2)); the
      # compiler above is the check there.
      if not older? or Version.compare(System.version(), "1.14.0") != :lt do
        case FloorSyntax.check_string(source, "fixture.ex", @newer_kernel) do
          [] ->
            flunk("not caught: #{source}")

          [problem | _] ->
            assert problem =~ unquote(said) or problem =~ "does not parse on Elixir",
                   "caught as something else: #{problem}"
        end
      end
    end
  end

  test "passes what Elixir 1.10 compiles, and it compiles here" do
    for source <- @floor do
      assert FloorSyntax.check_string(source, "fixture.ex", @newer_kernel) == [], source
      assert compiles?(source), "does not compile on Elixir #{System.version()}: #{source}"
    end
  end

  test "a function of the file's own is not Kernel's" do
    source = "defp then(x, f), do: f.(x)\ndef g(x), do: then(x, & &1)"
    assert FloorSyntax.check_string(source, "fixture.ex", @newer_kernel) == []
  end

  test "names the file and line" do
    assert ["lib/x.ex:3: an expression as a bitstring size" <> _] =
             FloorSyntax.check_string(
               "a = 1\nb = 2\nc = <<a::size(b * 8)>>",
               "lib/x.ex",
               @newer_kernel
             )
  end

  defp compiles?(body) do
    module = :"Elixir.FloorFixture#{System.unique_integer([:positive])}"

    capture_io(:stderr, fn ->
      send(self(), {:compiled, compile(module, body)})
    end)

    assert_received {:compiled, compiled?}
    compiled?
  end

  defp compile(module, body) do
    Code.compile_string("defmodule #{inspect(module)} do\n#{body}\nend", "fixture.ex")
    :code.purge(module)
    :code.delete(module)
    true
  rescue
    _ -> false
  end
end
