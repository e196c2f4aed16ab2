// Small DOM and identity helpers shared by the app's modules.

export const $ = (id) => document.getElementById(id)

/** Create an element: h('li', {class: 'x', onclick}, 'text', child) */
export const h = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag)
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value)
    else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value)
    else if (key === 'dataset') Object.assign(el.dataset, value)
    else el.setAttribute(key, value === true ? '' : value)
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue
    el.append(child instanceof Node ? child : String(child))
  }
  return el
}

/** A stable, readable colour for a user id (the server keeps a client's #rrggbb colour). */
export const colorFor = (id) => {
  let hash = 2166136261
  for (let i = 0; i < id.length; i++) hash = Math.imul(hash ^ id.charCodeAt(i), 16777619) >>> 0
  const hue = hash % 360
  const sat = 0.65
  const light = 0.45
  const f = (n) => {
    const k = (n + hue / 30) % 12
    const c = light - sat * Math.min(light, 1 - light) * Math.max(-1, Math.min(k - 3, 9 - k, 1))
    return Math.round(c * 255).toString(16).padStart(2, '0')
  }
  return `#${f(0)}${f(8)}${f(4)}`
}

export const initials = (name) => {
  const parts = String(name || '?').trim().split(/\s+/).filter(Boolean)
  const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] || '?').slice(0, 2)
  return letters.toUpperCase()
}

export const avatar = (name, color, extra = {}) =>
  h('span', { class: 'avatar', style: { background: color }, title: name, ...extra }, initials(name))

let toastTimer = null
export const toast = (text, kind = 'info') => {
  const el = $('toast')
  el.textContent = text
  el.dataset.kind = kind
  el.hidden = false
  clearTimeout(toastTimer)
  toastTimer = setTimeout(() => { el.hidden = true }, 4000)
}

/** Encode a room name for a URL path: each segment escaped, '/' kept. */
export const roomPath = (room) => room.split('/').map(encodeURIComponent).join('/')

export const roomUrl = (room) => `/r/${roomPath(room)}`

export const timeOf = (ts) => {
  const d = new Date(ts * 1000)
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
}
