# Where a sidecar track's time goes: the same 10k tracks from 4 callers,
# in one VM, rounds taking the variants in turn (so that the VM's drift
# hits them alike):
#
#   * port write only: each caller writes the track's frame to a port of
#     the same sidecar binary, and nothing else. The floor of the design
#     (protocol v3: writes are not answered): the pipe write, the sidecar's
#     work, the wake-ups that takes;
#   * backend: `Drab.Presence` on `backend: :sidecar`, which also checks
#     the input, encodes the meta, takes the owner's lock, decides the
#     write against the journal, journals and counts it, and has a monitor
#     process watch each new owner;
#   * NIF: the same module on the default backend, for scale.
#
#   MIX_ENV=bench mix run bench/sidecar_floor.exs [rounds]   (default 7)

alias Drab.Presence.Backend.Sidecar
alias Drab.Presence.Sidecar.Wire

rounds = String.to_integer(List.first(System.argv()) || "7")

defmodule Bench.SidecarFloor.OnSidecar do
  use Drab.Presence, otp_app: :drab_presence, backend: :sidecar
end

defmodule Bench.SidecarFloor.OnNif do
  use Drab.Presence, otp_app: :drab_presence
end

defmodule Bench.SidecarFloor do
  @n 10_000
  @callers 4
  @meta %{online_at: 1_700_000_000}

  # The sidecar alone, after the handshake, with this process as its port
  # owner (the writes are not answered; a refused one would be).
  def open_port(path) do
    port = Port.open({:spawn_executable, path}, [:binary, {:packet, 4}, :use_stdio])
    :ok = handshake(port, :hello, ["DRPS", <<Wire.version()::16>>])
    :ok = handshake(port, :configure, Wire.configure_body({100_000, false}))
    port
  end

  defp handshake(port, name, body) do
    op = Wire.op_byte(name)
    ok = Wire.status_byte(:ok)
    Port.command(port, Wire.request(name, op, 0, body))

    receive do
      {^port, {:data, <<^op, _id::64, 0::64, ^ok, _::binary>>}} -> :ok
    after
      5_000 -> raise "the sidecar did not answer #{name}"
    end
  end

  # µs per track, every call returned, from @callers callers.
  def write_only_round(port, round) do
    meta = :erlang.term_to_binary(@meta)

    # The owners' exits afterwards, as the backend's monitors send them, so
    # that every round starts from the same table.
    exits = fn owners ->
      Port.command(port, Wire.exit_frame(for owner <- owners, do: {Wire.pid_id(owner), []}))
    end

    run(exits, fn owner, i ->
      frame = Wire.track_frame(Wire.pid_id(owner), "floor:#{round}", "u#{i}", i, meta)
      Port.command(port, frame)
    end)
  end

  def module_round(module, round) do
    run(fn _owners -> :ok end, fn owner, i ->
      {:ok, _} = module.track(owner, "floor:#{round}", "u#{i}", @meta)
    end)
  end

  defp run(after_round, track) do
    owners = for _ <- 1..@n, do: spawn(fn -> receive(do: (:stop -> :ok)) end)
    parent = self()
    t0 = System.monotonic_time(:microsecond)

    for chunk <- Enum.chunk_every(Enum.with_index(owners), div(@n, @callers)) do
      spawn_link(fn ->
        for {owner, i} <- chunk, do: track.(owner, i)
        send(parent, :done)
      end)
    end

    for _ <- 1..@callers, do: receive(do: (:done -> :ok))
    us = (System.monotonic_time(:microsecond) - t0) / @n
    Enum.each(owners, &send(&1, :stop))
    after_round.(owners)
    us
  end

  def summary(values) do
    sorted = Enum.sort(values)
    median = Enum.at(sorted, div(length(sorted), 2))
    :io_lib.format("~.1f (~.1f-~.1f)", [median, hd(sorted), List.last(sorted)])
  end
end

alias Bench.SidecarFloor
alias Bench.SidecarFloor.{OnNif, OnSidecar}

{:ok, _} = OnSidecar.start_link()
{:ok, _} = OnNif.start_link()
port = SidecarFloor.open_port(Sidecar.executable())

variants = [
  {"port write only (the track's frame, nothing else)", &SidecarFloor.write_only_round(port, &1)},
  {"backend: :sidecar", &SidecarFloor.module_round(OnSidecar, &1)},
  {"backend: :nif", &SidecarFloor.module_round(OnNif, &1)}
]

IO.puts("#{System.schedulers_online()} schedulers; #{rounds} rounds of 10k tracks, 4 callers")
# Warm-up, unreported.
for {_, round} <- variants, do: round.(0)

results =
  for r <- 1..rounds, {label, round} <- variants do
    us = round.(r)
    IO.puts("  round #{r}, #{label}: #{Float.round(us, 2)} µs per track")
    {label, us}
  end

IO.puts("\nµs per track, median (min-max):")

for {label, _} <- variants do
  IO.puts("  #{label}: #{SidecarFloor.summary(for {^label, us} <- results, do: us)}")
end
