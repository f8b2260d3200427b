defmodule Drab.Presence.Options do
  @moduledoc false
  # The one schema of the options a presence module accepts, checked up front
  # and rendered into the docs. No NimbleOptions (no hex here): the same
  # shape, written once.

  require Logger

  @schema [
    otp_app: [
      type: :atom,
      doc: "the OTP app whose env holds more options, under the presence module's name"
    ],
    pubsub_server: [
      type: :atom_or_nil,
      default: nil,
      doc:
        "the `Phoenix.PubSub` server diffs are broadcast on. Without it (or without " <>
          "phoenix_pubsub loaded), subscribers use `subscribe/1`'s built-in registry; " <>
          "where Phoenix is loaded, a module started without it logs a warning, unless " <>
          "`nil` is given"
    ],
    diff_window: [
      type: {:integer_in, 0, 60_000},
      default: 50,
      doc:
        "milliseconds during which changes to a topic are gathered into one `presence_diff`. " <>
          "`0` is Phoenix.Presence's behaviour: one `presence_diff` per operation, in the " <>
          "order of the operations on each topic, nothing cancelled or merged (see \"Diffs\" " <>
          "in `Drab.Presence`)"
    ],
    max_meta_bytes: [
      type: {:integer_in, 1, 1_073_741_824},
      default: 65_536,
      doc:
        "largest meta accepted, as `:erlang.term_to_binary/1` encodes it (at most 1 GiB). " <>
          "A restart with a new value applies it to the running table"
    ],
    backend: [
      type: {:in, [:nif, :sidecar]},
      default: :nif,
      doc:
        "where the table lives: `:nif`, in this VM, or `:sidecar`, in an OS process of its " <>
          "own spoken to through a port (restarted and replayed if it dies). It cannot " <>
          "change while the table lives, that is until the VM restarts. A build with " <>
          "`config :drab_presence, nif: false` has no NIF, and defaults to `:sidecar`"
    ],
    cluster: [
      type: {:in, [:auto, false]},
      default: :auto,
      doc:
        "`:auto` replicates presences with the same module on every connected node: " <>
          "through `pubsub_server` when Phoenix.PubSub is loaded, else over Erlang " <>
          "distribution with OTP's `:pg`. `false` keeps this node's presences to itself"
    ],
    heartbeat_period: [
      type: {:integer_in, 10, 3_600_000},
      default: 1_500,
      doc:
        "in cluster mode, milliseconds between heartbeats while this node's presences " <>
          "change: a heartbeat carries the number of the last delta, so a lost one is " <>
          "repaired within a period. A quiet node heartbeats every third of `down_period`"
    ],
    down_period: [
      type: {:integer_in, 10, 86_400_000},
      default: 30_000,
      doc:
        "milliseconds without a word from a peer after which its presences leave. " <>
          "Where nodes are connected by Erlang distribution, nodedown does it at once. " <>
          "Must be longer than `heartbeat_period`"
    ],
    permdown_period: [
      type: {:integer_in, 10, 604_800_000},
      default: 1_200_000,
      doc:
        "milliseconds a peer may stay down before it is forgotten for good. " <>
          "At least `down_period`"
    ],
    # Drab's own keys, read by Drab.Presence.Config and passed over here.
    id: [type: :any, doc: false],
    module: [type: :atom, doc: false],
    endpoint: [type: :atom_or_nil, doc: false]
  ]

  @type t :: [
          otp_app: atom(),
          pubsub_server: atom() | nil,
          diff_window: 0..60_000,
          max_meta_bytes: pos_integer(),
          backend: :nif | :sidecar,
          cluster: :auto | false,
          heartbeat_period: pos_integer(),
          down_period: pos_integer(),
          permdown_period: pos_integer()
        ]

  # Phoenix.Tracker's options, which Phoenix.Presence passes through: a
  # module migrated from `use Phoenix.Presence` keeps them. Those with a
  # meaning here become our options (unless ours are given); the others
  # have none (one table, no shards; no clocks to sample; our own log
  # levels) and are ignored with one debug log.
  @tracker_options [
    :pool_size,
    :broadcast_period,
    :max_silent_periods,
    :clock_sample_periods,
    :log_level
  ]

  @doc """
  Merges `layers` (keyword lists, each over the ones before it), takes in
  Phoenix.Tracker's options, validates the result against the schema and
  fills in defaults. Raises `ArgumentError` naming the bad key.
  """
  @spec validate!([keyword()]) :: keyword()
  def validate!(layers) do
    for options <- layers, not Keyword.keyword?(options) do
      raise ArgumentError, "presence options must be a keyword list, got: #{inspect(options)}"
    end

    opts = layers |> Enum.reduce([], &Keyword.merge(&2, &1)) |> from_tracker_options()

    known = Keyword.keys(@schema)

    case Keyword.keys(opts) -- known do
      [] ->
        :ok

      unknown ->
        raise ArgumentError,
              "unknown presence options #{inspect(Enum.uniq(unknown))}; known options are " <>
                inspect(known) <> " (and Phoenix.Tracker's #{inspect(@tracker_options)})"
    end

    for {key, value} <- opts do
      check!(key, value, @schema[key][:type])
    end

    defaults =
      for {key, spec} <- @schema, Keyword.has_key?(spec, :default), do: {key, spec[:default]}

    defaults
    |> Keyword.merge(opts)
    |> check_backend!(Keyword.has_key?(opts, :backend), Drab.Presence.Native.enabled?())
    |> check_periods!()
  end

  @doc false
  # A build without the NIF (`config :drab_presence, nif: false`) defaults
  # to the sidecar, and refuses the NIF by name.
  @spec check_backend!(keyword(), boolean(), boolean()) :: keyword()
  def check_backend!(opts, _given?, true = _nif?), do: opts
  def check_backend!(opts, false = _given?, false), do: Keyword.put(opts, :backend, :sidecar)

  def check_backend!(opts, true, false) do
    if opts[:backend] == :nif do
      raise ArgumentError,
            "backend: :nif needs the NIF, which this build of drab_presence leaves out " <>
              "(`config :drab_presence, nif: false`): use backend: :sidecar, or remove that " <>
              "config and recompile drab_presence (mix deps.compile drab_presence --force)"
    end

    opts
  end

  # `broadcast_period` is how often a tracker tells its peers what changed:
  # our `heartbeat_period`. Phoenix's `down_period` defaults to
  # `broadcast_period * max_silent_periods * 2` (30 s, as ours), so a module
  # that sets either keeps the down period it had.
  defp from_tracker_options(opts) do
    {tracker, opts} = Keyword.split(opts, @tracker_options)

    if tracker == [] do
      opts
    else
      broadcast = Keyword.get(tracker, :broadcast_period, 1_500)
      silent = Keyword.get(tracker, :max_silent_periods, 10)

      for {key, value} <- tracker,
          key in [:broadcast_period, :max_silent_periods],
          not is_integer(value) or value < 1 do
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected a positive integer, got: #{inspect(value)}"
      end

      ignored = Keyword.keys(tracker) -- [:broadcast_period, :max_silent_periods]

      if ignored != [] do
        Logger.debug(
          "Drab.Presence ignores the Phoenix.Tracker options #{inspect(ignored)}: " <>
            "they have no meaning for its table"
        )
      end

      opts
      |> put_new_if(Keyword.has_key?(tracker, :broadcast_period), :heartbeat_period, broadcast)
      |> put_new_if(
        Keyword.has_key?(tracker, :broadcast_period) or
          Keyword.has_key?(tracker, :max_silent_periods),
        :down_period,
        broadcast * silent * 2
      )
    end
  end

  defp put_new_if(opts, true, key, value), do: Keyword.put_new(opts, key, value)
  defp put_new_if(opts, false, _key, _value), do: opts

  # Periods that only make sense in one order.
  defp check_periods!(opts) do
    cond do
      opts[:down_period] <= opts[:heartbeat_period] ->
        raise ArgumentError,
              "invalid value for :down_period: it must be longer than :heartbeat_period " <>
                "(#{opts[:heartbeat_period]}), got: #{opts[:down_period]}"

      opts[:permdown_period] < opts[:down_period] ->
        raise ArgumentError,
              "invalid value for :permdown_period: it must be at least :down_period " <>
                "(#{opts[:down_period]}), got: #{opts[:permdown_period]}"

      true ->
        opts
    end
  end

  @doc """
  Whether each operation makes its own diff: `diff_window: 0`, which is
  Phoenix.Presence's behaviour (the backends' `diff_per_operation` flag).
  """
  @spec diff_per_operation?(keyword()) :: boolean()
  def diff_per_operation?(opts), do: Keyword.get(opts, :diff_window) == 0

  @doc "The options rendered as a markdown list, for `@moduledoc`."
  @spec docs() :: String.t()
  def docs do
    for {key, spec} <- @schema, spec[:doc] != false, into: "" do
      default =
        if Keyword.has_key?(spec, :default),
          do: " Defaults to `#{inspect(spec[:default])}`.",
          else: ""

      "  * `#{inspect(key)}` - #{spec[:doc]}.#{default}\n"
    end <>
      "\nPhoenix.Tracker's options are taken too, so that a module moved from " <>
      "`use Phoenix.Presence` keeps its own: `:broadcast_period` is `:heartbeat_period`, " <>
      "and with `:max_silent_periods` it sets `:down_period` as Phoenix does " <>
      "(`broadcast_period * max_silent_periods * 2`), unless those are given; " <>
      "`:pool_size`, `:clock_sample_periods` and `:log_level` have no meaning here " <>
      "and are ignored.\n"
  end

  defp check!(_key, _value, :any), do: :ok
  defp check!(_key, value, :atom) when is_atom(value) and not is_nil(value), do: :ok
  defp check!(_key, value, :atom_or_nil) when is_atom(value), do: :ok
  defp check!(_key, value, :non_neg_integer) when is_integer(value) and value >= 0, do: :ok
  defp check!(_key, value, :pos_integer) when is_integer(value) and value > 0, do: :ok

  defp check!(_key, value, {:integer_in, min, max})
       when is_integer(value) and value >= min and value <= max,
       do: :ok

  defp check!(key, value, {:in, allowed}) do
    if value in allowed,
      do: :ok,
      else:
        raise(
          ArgumentError,
          "invalid value for #{inspect(key)}: expected one of #{inspect(allowed)}, got: #{inspect(value)}"
        )
  end

  defp check!(key, value, type) do
    raise ArgumentError,
          "invalid value for #{inspect(key)}: expected #{describe(type)}, got: #{inspect(value)}"
  end

  defp describe(:atom), do: "an atom"
  defp describe(:atom_or_nil), do: "an atom or nil"
  defp describe(:non_neg_integer), do: "a non-negative integer"
  defp describe(:pos_integer), do: "a positive integer"
  defp describe({:integer_in, min, max}), do: "an integer from #{min} to #{max}"
end
