defmodule Drab.PresenceCase do
  @moduledoc false
  # Each test gets its own topic and a supply of live processes to track.
  use ExUnit.CaseTemplate

  using do
    quote do
      import Drab.PresenceCase
    end
  end

  setup context do
    {:ok, topic: "topic:#{inspect(context.module)}.#{context.test}"}
  end

  @doc "A live process that stays until the test ends (or is killed)."
  @spec live_pid() :: pid()
  def live_pid do
    pid = spawn(fn -> Process.sleep(:infinity) end)
    ExUnit.Callbacks.on_exit(fn -> Process.exit(pid, :kill) end)
    pid
  end

  @doc "A socket as Drab hands it to presence: topic, channel_pid and assigns."
  @spec socket(String.t(), map()) :: map()
  def socket(topic, assigns \\ %{}) do
    %{
      topic: topic,
      channel_pid: live_pid(),
      assigns: Map.merge(%{__client_id: "browser-#{System.unique_integer([:positive])}"}, assigns)
    }
  end

  @doc "Polls `fun` every 10 ms until it returns true; fails the test after `tries`."
  @spec wait_until((() -> boolean()), pos_integer()) :: :ok
  def wait_until(fun, tries \\ 500) do
    cond do
      fun.() -> :ok
      tries == 0 -> ExUnit.Assertions.flunk("condition never became true")
      true -> Process.sleep(10) && wait_until(fun, tries - 1)
    end
  end

  @doc "Waits for the next presence_diff on `topic` and returns its payload."
  defmacro assert_diff(topic, timeout \\ 1_000) do
    quote do
      assert_receive %{event: "presence_diff", topic: ^unquote(topic), payload: payload},
                     unquote(timeout)

      payload
    end
  end

  @doc """
  Runs `script` in a new `elixir` OS process with only this app's ebin added
  to Elixir's own code path: no module of the suite is loaded there, and no
  atom it made exists. Returns `{output, exit_status}`, stderr included.
  Killed after `timeout_s` seconds where coreutils' `timeout` exists.
  """
  @spec run_clean_vm(Path.t(), [String.t()], pos_integer()) :: {String.t(), non_neg_integer()}
  def run_clean_vm(script, args \\ [], timeout_s \\ 60) do
    elixir = System.find_executable("elixir") || raise "elixir is not on the PATH"
    ebin = :drab_presence |> :code.lib_dir(:ebin) |> List.to_string()
    argv = ["-pa", ebin, script | args]

    case System.find_executable("timeout") do
      nil ->
        System.cmd(elixir, argv, stderr_to_stdout: true)

      timeout ->
        System.cmd(timeout, ["-k", "5", "#{timeout_s}", elixir | argv], stderr_to_stdout: true)
    end
  end

  @doc """
  Applies a `presence_diff` payload to a view shaped like `list/1`, exactly as
  phoenix.js `Presence.syncDiff` does: a joined key gets the joined metas plus
  its current metas whose `phx_ref` is not among them; leaves remove metas by
  `phx_ref`, and a key with none left goes. Applying a diff twice is harmless.
  """
  @spec sync_diff(map(), %{joins: map(), leaves: map()}) :: map()
  def sync_diff(view, %{joins: joins, leaves: leaves}) do
    view =
      Enum.reduce(joins, view, fn {key, %{metas: joined} = presence}, view ->
        joined_refs = MapSet.new(joined, & &1.phx_ref)

        current =
          case view do
            %{^key => %{metas: metas}} -> Enum.reject(metas, &(&1.phx_ref in joined_refs))
            _ -> []
          end

        Map.put(view, key, %{presence | metas: current ++ joined})
      end)

    Enum.reduce(leaves, view, fn {key, %{metas: left}}, view ->
      case view do
        %{^key => %{metas: metas} = presence} ->
          left_refs = MapSet.new(left, & &1.phx_ref)

          case Enum.reject(metas, &(&1.phx_ref in left_refs)) do
            [] -> Map.delete(view, key)
            kept -> Map.put(view, key, %{presence | metas: kept})
          end

        _ ->
          view
      end
    end)
  end

  @doc "Metas of a listed or diffed presence map, without the refs, sorted."
  @spec bare(map()) :: %{String.t() => [map()]}
  def bare(presences) do
    Map.new(presences, fn {key, %{metas: metas}} ->
      {key, metas |> Enum.map(&Map.drop(&1, [:phx_ref, :phx_ref_prev])) |> Enum.sort()}
    end)
  end
end
